#!/usr/bin/env bash
# A virtual sound card for headless Linux (CI, containers): a private PulseAudio daemon with a
# microphone and a speaker that PortAudio/sounddevice reaches through ALSA's pulse plugin.
#
#   bus      null sink, 2 channels, float32, 24 kHz: the one clock everything runs on
#   speaker  sink   -> bus right channel   default sink: what `moshi-mlx chat` plays to
#   micfeed  sink   -> bus left channel    tests play the "microphone" audio into it
#   virtmic  source <- bus left channel    default source: what `moshi-mlx chat` records
#
# Tests feed the mic with   pacat --raw --format=float32le --rate=24000 --channels=1 -d micfeed F
# and listen on bus.monitor (stereo: left = microphone, right = speaker, one clock), so the
# left-to-right lag of a recording is the app's true mic-to-speaker latency.
#
# A small low-latency recorder stays attached to bus.monitor: it makes the null sink tick every
# few ms instead of sleeping through its 2 s default block, which would stall new streams.
#
#   scripts/audio_env.sh install   apt-get the packages (root)
#   scripts/audio_env.sh start     start if not running (idempotent; quiet unless it fails)
#   scripts/audio_env.sh env       print the `export` lines clients need: eval "$(... env)"
#   scripts/audio_env.sh status    exit 0 if up
#   scripts/audio_env.sh stop
# AUDIO_ENV_DIR (default /tmp/moshi-mlx-audio) holds the daemon's socket, state and log; several
# independent sound cards can run side by side with different folders.
set -euo pipefail

DIR="${AUDIO_ENV_DIR:-/tmp/moshi-mlx-audio}"
RATE=24000
SOCK_DIR="$DIR/run"
PACKAGES=(libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins)

fail() {
  echo "audio_env.sh: $*" >&2
  if [ -s "$DIR/pulse.log" ]; then tail -n 10 "$DIR/pulse.log" >&2; fi
  exit 1
}

print_env() {
  echo "export PULSE_SERVER=unix:$SOCK_DIR/native"
  echo "export PULSE_RUNTIME_PATH=$SOCK_DIR"
  echo "export PULSE_STATE_PATH=$DIR/state"
  echo "export PULSE_CLIENTCONFIG=$DIR/client.conf"
  echo "export PULSE_COOKIE=$DIR/state/cookie"
}
eval "$(print_env)"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$SOCK_DIR}"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
answering() { timeout 5 pactl info >/dev/null 2>&1; }
has_devices() {
  local names
  names="$( (timeout 5 pactl list short sinks; timeout 5 pactl list short sources) 2>/dev/null \
    | cut -f2)" || return 1
  for dev in bus speaker micfeed virtmic; do grep -qx "$dev" <<<"$names" || return 1; done
}

# The null sink's current latency in microseconds (large until the ticker's request applies).
bus_latency_us() {
  timeout 5 pactl list sinks 2>/dev/null \
    | awk '/^\tName: /{on = ($2 == "bus")} on && /^\tLatency:/{print $2; exit}'
}

wait_low_latency() {
  local us=""
  for _ in $(seq 60); do
    us="$(bus_latency_us)"
    if [ -n "$us" ] && [ "$us" -lt 50000 ]; then return 0; fi
    sleep 0.1
  done
  fail "the bus sink never reached low latency (latency ${us:-unknown} us)"
}

start_ticker() {
  setsid parecord --raw --latency-msec=10 -d bus.monitor /dev/null </dev/null >/dev/null 2>&1 &
  echo $! >"$DIR/ticker.pid"
  sleep 0.2
  alive "$DIR/ticker.pid" || fail "the bus ticker (parecord) did not start"
  wait_low_latency
}

write_config() {
  printf 'autospawn = no\ndefault-server = unix:%s/native\n' "$SOCK_DIR" >"$DIR/client.conf"
  local remap="channels=1 channel_map=mono remix=no"
  cat >"$DIR/daemon.pa" <<EOF
.fail
load-module module-native-protocol-unix auth-anonymous=1 socket=$SOCK_DIR/native
load-module module-null-sink sink_name=bus rate=$RATE channels=2 channel_map=front-left,front-right format=float32le sink_properties=device.description=MoshiBus
load-module module-remap-sink sink_name=speaker master=bus $remap master_channel_map=front-right sink_properties=device.description=MoshiVirtualSpeaker
load-module module-remap-sink sink_name=micfeed master=bus $remap master_channel_map=front-left sink_properties=device.description=MoshiMicFeed
load-module module-remap-source source_name=virtmic master=bus.monitor $remap master_channel_map=front-left source_properties=device.description=MoshiVirtualMic
set-default-sink speaker
set-default-source virtmic
EOF
}

start() {
  local tool
  for tool in pulseaudio pactl pacat parecord timeout setsid; do
    command -v "$tool" >/dev/null || fail "'$tool' is missing: run '$0 install' (apt: ${PACKAGES[*]})"
  done
  compgen -G "/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so" >/dev/null \
    || fail "ALSA's pulse plugin is missing (apt: libasound2-plugins)"
  compgen -G "/usr/lib/*/libportaudio.so.2" >/dev/null \
    || fail "PortAudio is missing (apt: libportaudio2)"
  mkdir -p "$SOCK_DIR" "$DIR/state"
  chmod 700 "$SOCK_DIR" "$DIR/state"

  if answering && has_devices; then
    if alive "$DIR/ticker.pid"; then wait_low_latency; else start_ticker; fi
    return 0
  fi
  if alive "$SOCK_DIR/pid"; then  # ours but broken: start over
    kill "$(cat "$SOCK_DIR/pid")" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$SOCK_DIR/pid" "$SOCK_DIR/native"
  write_config
  # Root is fine here: -n skips the system default.pa, and no D-Bus or systemd is needed.
  # A raised priority (nice -11) where allowed, as a desktop's sound server has: on a busy
  # machine the devices keep their clock, and what is tested is the app's own scheduling.
  timeout 15 pulseaudio --daemonize=yes -n -F "$DIR/daemon.pa" --exit-idle-time=-1 \
    --realtime=no --high-priority=yes --use-pid-file=yes \
    --log-target="file:$DIR/pulse.log" --log-level=notice \
    || fail "pulseaudio did not start"
  for _ in $(seq 100); do answering && break; sleep 0.1; done
  answering || fail "pulseaudio does not answer on $PULSE_SERVER"
  has_devices || fail "the virtual devices are missing after start"
  start_ticker
}

stop() {
  if alive "$DIR/ticker.pid"; then kill "$(cat "$DIR/ticker.pid")" 2>/dev/null || true; fi
  rm -f "$DIR/ticker.pid"
  if alive "$SOCK_DIR/pid"; then
    local pid
    pid="$(cat "$SOCK_DIR/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$SOCK_DIR/pid"
}

install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || fail "apt-get install ${PACKAGES[*]} failed"
}

case "${1:-start}" in
  install) install ;;
  start) start ;;
  env) print_env ;;
  stop) stop ;;
  status)
    if answering && has_devices && alive "$DIR/ticker.pid"; then
      echo "virtual sound card up ($PULSE_SERVER, bus latency $(bus_latency_us) us)"
    else
      echo "virtual sound card down" >&2
      exit 1
    fi
    ;;
  *) echo "usage: $0 [install|start|env|status|stop]" >&2; exit 2 ;;
esac
