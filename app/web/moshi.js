// The page of `moshi-mlx serve`: microphone -> /api/chat -> Moshi's voice and transcript.
// Kyutai's protocol with our own audio framing (audio_format=pcm_s16le: kind 1 carries 16-bit
// PCM at 24 kHz mono both ways), so the page needs no codec and no build step.
"use strict";

const KIND = { handshake: 0, audio: 1, text: 2, metadata: 4, error: 5 };
const $ = (id) => document.getElementById(id);

// What a test (or a curious person) can read from the console.
window.moshi = { state: "idle", transcript: "", outputRms: 0, maxOutputRms: 0, framesIn: 0 };

let session = null;

function show(message) {
  const box = $("message");
  box.hidden = !message;
  box.textContent = message || "";
}

function setState(state, text) {
  window.moshi.state = state;
  $("state").textContent = text;
  $("state").classList.toggle("live", state === "live");
  $("talk").textContent = state === "idle" ? "Talk" : "Stop";
  $("talk").classList.toggle("stop", state !== "idle");
  $("role").disabled = $("voice").disabled = state !== "idle";
}

async function loadVoices() {
  try {
    const r = await fetch("api/voices" + location.search);
    const { voices } = await r.json();
    for (const name of voices) $("voice").add(new Option(name, name));
  } catch (e) {
    /* no voices: the server's default only */
  }
}

function chatUrl() {
  const params = new URLSearchParams({ audio_format: "pcm_s16le" });
  const token = new URLSearchParams(location.search).get("token");
  if (token) params.set("token", token);
  const role = $("role").value.trim();
  if (role) params.set("text_prompt", role);
  if ($("voice").value) params.set("voice_prompt", $("voice").value);
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = params.toString();
  return url.toString();
}

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error(
      "This browser gives no microphone to this page: open it over https, or as localhost on the server's machine."
    );
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: {
        channelCount: 1,
        echoCancellation: true,
        noiseSuppression: true,
        autoGainControl: true,
      },
    });
  } catch (e) {
    if (e.name === "NotAllowedError" || e.name === "SecurityError") {
      throw new Error(
        "The microphone was refused. Allow it for this page (the icon in the address bar), then press Talk again."
      );
    }
    if (e.name === "NotFoundError") throw new Error("No microphone was found.");
    throw new Error(`The microphone could not be opened: ${e.message}`);
  }
}

async function start() {
  show("");
  setState("starting", "opening the microphone…");
  const s = { closed: false, pending: 0 };
  session = s;
  try {
    s.stream = await openMicrophone();
    s.ctx = new AudioContext();
    await s.ctx.audioWorklet.addModule("worklet.js");
    await s.ctx.resume();
  } catch (e) {
    stop(e.message);
    return;
  }
  if (s.closed) return;
  const ctx = s.ctx;
  s.capture = new AudioWorkletNode(ctx, "moshi-capture");
  s.playback = new AudioWorkletNode(ctx, "moshi-playback", { outputChannelCount: [1] });
  s.analyser = new AnalyserNode(ctx, { fftSize: 2048 });
  s.source = ctx.createMediaStreamSource(s.stream);
  s.source.connect(s.capture);
  s.playback.connect(s.analyser).connect(ctx.destination);
  s.buffered = 0;
  s.playback.port.onmessage = (e) => {
    if (e.data.buffered_ms !== undefined) s.buffered = e.data.buffered_ms;
  };

  setState("starting", "connecting…");
  const ws = new WebSocket(chatUrl());
  s.ws = ws;
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => receive(s, new Uint8Array(e.data));
  ws.onerror = () => {};
  ws.onclose = () => {
    if (!s.closed) stop(s.error || (s.live ? "The conversation ended." : "Could not connect to the server."));
  };
  s.capture.port.onmessage = (e) => {
    if (!s.live || ws.readyState !== WebSocket.OPEN) return;
    const pcm = e.data;
    const message = new Uint8Array(1 + 2 * pcm.length);
    message[0] = KIND.audio;
    const view = new DataView(message.buffer);
    for (let i = 0; i < pcm.length; i++) {
      const v = Math.max(-1, Math.min(1, pcm[i]));
      view.setInt16(1 + 2 * i, Math.round(v * 32767), true);
    }
    ws.send(message);
  };
  s.meter = setInterval(() => measure(s), 50);
}

function receive(s, data) {
  const kind = data[0];
  const payload = data.subarray(1);
  if (kind === KIND.handshake) {
    s.live = true;
    setState("live", "live: speak now");
  } else if (kind === KIND.audio) {
    const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    const pcm = new Float32Array(payload.byteLength / 2);
    for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(2 * i, true) / 32768;
    s.playback.port.postMessage(pcm, [pcm.buffer]);
    window.moshi.framesIn++;
  } else if (kind === KIND.text) {
    const piece = new TextDecoder().decode(payload);
    window.moshi.transcript += piece;
    const box = $("transcript");
    box.textContent += piece;
    box.scrollTop = box.scrollHeight;
  } else if (kind === KIND.metadata) {
    const meta = JSON.parse(new TextDecoder().decode(payload));
    if (meta.dropped !== undefined) $("dropped").textContent = meta.dropped;
    if (meta.server_latency_ms != null) {
      // capture framing (80 ms) + the server's own latency + what waits in our playback buffer
      const ms = 80 + meta.server_latency_ms + s.buffered;
      $("latency").textContent = `${Math.round(ms)} ms`;
      window.moshi.latencyMs = ms;
    }
  } else if (kind === KIND.error) {
    const text = new TextDecoder().decode(payload);
    s.error = text.startsWith("busy")
      ? "Moshi is busy in another conversation. Try again when it ends."
      : `The server says: ${text}`;
  }
}

function measure(s) {
  const a = new Float32Array(s.analyser.fftSize);
  s.analyser.getFloatTimeDomainData(a);
  let sum = 0;
  for (const v of a) sum += v * v;
  const rms = Math.sqrt(sum / a.length);
  window.moshi.outputRms = rms;
  window.moshi.maxOutputRms = Math.max(window.moshi.maxOutputRms, rms);
  $("level").value = rms;
}

function stop(message) {
  const s = session;
  if (s) {
    s.closed = true;
    clearInterval(s.meter);
    if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close();
    if (s.stream) s.stream.getTracks().forEach((t) => t.stop());
    if (s.ctx) s.ctx.close();
  }
  session = null;
  setState("idle", message ? "stopped" : "not connected");
  show(message);
}

$("talk").onclick = () => (session ? stop("") : start());
loadVoices();
