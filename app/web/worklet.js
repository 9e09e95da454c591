// Audio worklets of the page: the microphone to 24 kHz frames, and Moshi's frames to the
// speakers. Both resample linearly between the context's rate and Moshi's 24 kHz.

const MOSHI_RATE = 24000;
const FRAME = 1920; // 80 ms at 24 kHz

// Microphone -> 1920-sample Float32 frames at 24 kHz, posted to the page.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / MOSHI_RATE; // input samples per output sample
    this.t = 0; // where the next output sample falls in this block (-1: the previous sample)
    this.prev = 0;
    this.frame = new Float32Array(FRAME);
    this.filled = 0;
  }

  process(inputs) {
    const x = inputs[0][0];
    if (!x) return true;
    const n = x.length;
    while (this.t < n - 1) {
      const i = Math.floor(this.t);
      const a = i < 0 ? this.prev : x[i];
      this.frame[this.filled++] = a + (x[i + 1] - a) * (this.t - i);
      this.t += this.step;
      if (this.filled === FRAME) {
        this.port.postMessage(this.frame, [this.frame.buffer]);
        this.frame = new Float32Array(FRAME);
        this.filled = 0;
      }
    }
    this.t -= n;
    this.prev = x[n - 1];
    return true;
  }
}

// Moshi's 24 kHz frames -> the speakers, through a small jitter buffer: playing starts once
// `start` samples wait, and beyond `most` the oldest are dropped (latency stays bounded).
class Playback extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = MOSHI_RATE / sampleRate;
    this.queue = [];
    this.offset = 0; // fractional read position in queue[0]
    this.waiting = 0; // samples queued
    this.start = FRAME; // 80 ms
    this.most = 5 * FRAME; // 400 ms
    this.playing = false;
    this.port.onmessage = (e) => {
      this.queue.push(e.data);
      this.waiting += e.data.length;
      while (this.waiting > this.most && this.queue.length > 1) {
        this.waiting -= this.queue.shift().length;
        this.offset = 0;
        this.port.postMessage({ dropped: 1 });
      }
    };
    this.reported = 0;
  }

  sample() {
    let frame = this.queue[0];
    const i = Math.floor(this.offset);
    const a = frame[i];
    const b = i + 1 < frame.length ? frame[i + 1] : this.queue[1] ? this.queue[1][0] : a;
    const value = a + (b - a) * (this.offset - i);
    this.offset += this.step;
    while (this.queue.length && this.offset >= this.queue[0].length) {
      this.offset -= this.queue[0].length;
      this.waiting -= this.queue.shift().length;
    }
    return value;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.waiting >= this.start) this.playing = true;
    for (let i = 0; i < out.length; i++) {
      if (this.playing && this.queue.length) {
        out[i] = this.sample();
      } else {
        out[i] = 0;
        this.playing = false; // ran dry: wait for `start` samples again
      }
    }
    if (currentFrame - this.reported >= sampleRate / 4) {
      this.reported = currentFrame;
      this.port.postMessage({ buffered_ms: (1000 * this.waiting) / MOSHI_RATE });
    }
    return true;
  }
}

registerProcessor("moshi-capture", Capture);
registerProcessor("moshi-playback", Playback);
