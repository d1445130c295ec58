// The browser client of `WS /api/chat` (protocol: moshi_ttt/protocol.py). One Session per
// connection: microphone -> capture worklet (80 ms frames at 24 kHz) -> PCM or Ogg/Opus ->
// socket -> model; model audio -> jitter-buffer worklet -> speakers; model text -> transcript;
// the server's TTT telemetry -> the "TTT learning" plot.

import { OpusReceiver, OpusSender, opusSupported } from './opus.js';
import { TelemetryPlot } from './ttt-plot.js';

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, METADATA: 4, ERROR: 5, PING: 6 };
const MODEL_RATE = 24000;
const FRAME_SIZE = 1920; // samples per 80 ms model frame
const FRAME_RATE = MODEL_RATE / FRAME_SIZE; // 12.5 model frames per second
const HEALTH_EVERY_MS = 2000;
const PLAYER = { startMs: 160, maxMs: 1000 }; // jitter buffer: start depth, latency bound
const CLOSE_CODES = {
  1000: 'normal', 1001: 'going away', 1003: 'unsupported message', 1006: 'connection lost',
  1007: 'invalid data', 1008: 'refused', 1009: 'message too big', 1011: 'server error',
  1013: 'server busy, try again later',
};

const $ = (id) => document.getElementById(id);

// Live figures of the current (or last) session; on `window` for the console and the tests.
const stats = {
  state: 'idle', mode: null, session: null, framesSent: 0, framesReceived: 0, bufferMs: 0,
  underruns: 0, droppedMs: 0, playedMs: 0, transcript: '', errors: [], closeCode: null,
  closeReason: '',
};
window.moshiStats = stats;

// The current (or last) session's TTT telemetry: `every` is the session info's frames between
// points (null: not said, 0: off), `telemetry` the parsed ttt_telemetry messages in arrival
// order, `plot` where the last draw put the plot's areas (CSS px; null while nothing is drawn),
// `draws` how many times it was drawn. `receive(meta)` takes a parsed METADATA message as if
// from the socket: for the console and the tests.
const ttt = {
  every: null, telemetry: [], receive: (meta) => onMetadata(meta),
  get plot() { return plot.geometry; },
  get draws() { return plot.draws; },
};
window.moshiTTT = ttt;

class Session {
  constructor(mode, apiKey) {
    this.mode = mode;
    this.apiKey = apiKey;
    this.sentSamples = 0; // 24 kHz samples the server has been sent
    this.receivedSamples = 0; // 24 kHz samples of model audio received
    this.ended = false;
  }

  async start() {
    setState('connecting', 'Opening the microphone…');
    this.stream = await openMicrophone();
    if (this.ended) return this.cleanup();
    this.ctx = await openAudioContext(this.stream);
    await this.ctx.audioWorklet.addModule(new URL('./worklets.js', import.meta.url));
    if (this.ended) return this.cleanup();

    // No outputs: the capture node is a sink, pulled by the graph, and the mic is never played.
    this.capture = new AudioWorkletNode(this.ctx, 'moshi-capture', {
      numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: 'explicit',
    });
    this.capture.port.onmessage = (e) => this.onMicFrame(e.data.frame, e.data.peak);
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.source.connect(this.capture);

    this.player = new AudioWorkletNode(this.ctx, 'moshi-player', {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: PLAYER,
    });
    this.player.port.onmessage = (e) => Object.assign(stats, {
      bufferMs: e.data.depthMs, underruns: e.data.underruns, droppedMs: e.data.droppedMs,
      playedMs: e.data.playedMs,
    });
    this.player.connect(this.ctx.destination);
    await this.ctx.resume();
    if (this.ended) return; // Disconnect was clicked meanwhile, and cleaned up

    setState('connecting', 'Connecting to the server…');
    const url = new URL('api/chat', document.baseURI);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('mode', this.mode);
    url.searchParams.set('telemetry', '1'); // the server's default for `mode=` clients; say so
    if (this.apiKey) url.searchParams.set('api_key', this.apiKey);
    this.ws = new WebSocket(url);
    this.ws.binaryType = 'arraybuffer';
    this.ws.onmessage = (e) => this.onMessage(e.data);
    this.ws.onclose = (e) => this.onClose(e.code, e.reason);
  }

  /** The user's disconnect: close the socket cleanly; onClose reports how it ended. */
  stop() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      setState('closing', 'Disconnecting…');
      this.ws.close(1000, 'client closed');
    } else { // still opening the microphone or the audio graph: start() stops at its next step
      this.ended = true;
      this.cleanup();
      sessionEnded('closed', 'Not connected');
    }
  }

  onMicFrame(frame, peak) {
    showLevel($('mic-level'), peak);
    // Nothing is sent before the server's handshake: it would keep only the last 2 s of it.
    if (stats.state !== 'live' || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.sender) {
      this.sender.encode(frame);
    } else {
      this.send(KIND.AUDIO, float32ToLE(frame), frame.length);
    }
  }

  send(kind, payload, samples) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    const msg = new Uint8Array(1 + payload.length);
    msg[0] = kind;
    msg.set(payload, 1);
    this.ws.send(msg);
    this.sentSamples += samples;
    stats.framesSent = Math.floor(this.sentSamples / FRAME_SIZE);
  }

  play(pcm, rate) {
    this.receivedSamples += (pcm.length * MODEL_RATE) / rate; // before the transfer empties it
    stats.framesReceived = Math.floor(this.receivedSamples / FRAME_SIZE);
    this.player.port.postMessage({ type: 'push', samples: pcm, rate }, [pcm.buffer]);
  }

  onMessage(data) {
    const bytes = new Uint8Array(data);
    if (bytes.length === 0) return;
    const payload = bytes.subarray(1);
    try {
      switch (bytes[0]) {
        case KIND.HANDSHAKE:
          if (this.mode === 'opus') {
            this.sender = new OpusSender((page, samples) => this.send(KIND.AUDIO, page, samples),
              (msg) => this.fail(msg));
            this.receiver = new OpusReceiver((pcm, rate) => this.play(pcm, rate),
              (msg) => this.fail(msg));
          }
          setState('live', 'Connected: speak');
          refreshHealth();
          break;
        case KIND.METADATA: { // unreadable metadata is ignored: it must not end the talk
          const text = new TextDecoder().decode(payload);
          let meta = null;
          try {
            meta = JSON.parse(text);
          } catch { /* not JSON: ignored below */ }
          if (meta !== null && typeof meta === 'object' && !Array.isArray(meta)) onMetadata(meta);
          else console.warn(`ignored METADATA that is not a JSON object: ${text.slice(0, 200)}`);
          break;
        }
        case KIND.AUDIO:
          if (this.receiver) this.receiver.push(payload);
          else this.play(float32FromLE(payload), MODEL_RATE);
          break;
        case KIND.TEXT:
          appendTranscript(new TextDecoder().decode(payload));
          break;
        case KIND.ERROR:
          showError(`Server: ${new TextDecoder().decode(payload)}`);
          break;
        default: // PING and kinds this client does not use
          break;
      }
    } catch (e) {
      this.fail(`Could not handle a message from the server: ${e.message}`);
    }
  }

  /** A failure on this side: say so, then end the session. */
  fail(message) {
    showError(message);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, 'client error');
  }

  onClose(code, reason) {
    this.ended = true;
    this.cleanup();
    // A session the user already left (Disconnect clicked again while it was closing): the
    // page, the button and `session` may be a newer session's by now; leave them to it.
    if (session !== this) return;
    stats.closeCode = code;
    stats.closeReason = reason;
    const what = CLOSE_CODES[code] || 'closed';
    const why = reason && reason !== what ? `: ${reason}` : '';
    sessionEnded(stats.errors.length ? 'error' : 'closed', `Closed (${code} ${what}${why})`);
  }

  /** Release the microphone and the audio graph; safe to call more than once. */
  cleanup() {
    this.sender?.close();
    this.receiver?.close();
    this.stream?.getTracks().forEach((t) => t.stop());
    this.source?.disconnect();
    this.capture?.port.close();
    this.player?.disconnect();
    this.ctx?.close().catch(() => {}); // already closing: nothing left to release
    this.sender = this.receiver = this.stream = this.source = this.capture = this.ctx = null;
    showLevel($('mic-level'), 0);
    stats.bufferMs = 0;
  }
}

async function openMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error('This page cannot use the microphone: browsers only allow it on secure ' +
      'pages. Open it over https, or as http://localhost (e.g. through an SSH tunnel).');
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true,
        autoGainControl: true },
    });
  } catch (e) {
    if (e.name === 'NotAllowedError') throw new Error('Microphone permission was denied.');
    if (e.name === 'NotFoundError') throw new Error('No microphone was found.');
    throw new Error(`Could not open the microphone: ${e.message}`);
  }
}

/** A 24 kHz context, so the browser resamples the mic; where a browser cannot connect a mic to
 * a context of another rate (Firefox), the device's rate and the worklets resample instead. */
async function openAudioContext(stream) {
  const ctx = new AudioContext({ sampleRate: MODEL_RATE, latencyHint: 'interactive' });
  try {
    ctx.createMediaStreamSource(stream).disconnect();
    return ctx;
  } catch {
    await ctx.close();
    return new AudioContext({ latencyHint: 'interactive' });
  }
}

// The protocol's samples are little-endian whatever the platform: DataView says so explicitly.
function float32ToLE(frame) {
  const out = new Uint8Array(frame.length * 4);
  const v = new DataView(out.buffer);
  for (let i = 0; i < frame.length; i++) v.setFloat32(4 * i, frame[i], true);
  return out;
}

function float32FromLE(bytes) {
  if (bytes.length % 4) throw new Error(`PCM message of ${bytes.length} bytes`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = v.getFloat32(4 * i, true);
  return out;
}

/** METADATA: the session info (servers before telemetry send it without `type`), or a
 * telemetry point; other types are a newer server's, with nothing here to show them. */
function onMetadata(meta) {
  if (meta.type === undefined || meta.type === 'session') showSessionInfo(meta);
  else if (meta.type === 'ttt_telemetry') addTelemetry(meta);
}

// -- UI ----------------------------------------------------------------------------------------

let session = null;

function setState(state, text) {
  stats.state = state;
  $('status').dataset.state = state;
  $('status-text').textContent = text;
}

function sessionEnded(state, text) {
  session = null;
  setButton(false);
  setState(state, text);
  refreshHealth();
}

function setButton(connected) {
  $('connect').textContent = connected ? 'Disconnect' : 'Connect';
  $('connect').classList.toggle('stop', connected);
}

function showError(message) {
  stats.errors.push(message);
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
}

function appendTranscript(piece) {
  const box = $('transcript');
  stats.transcript += piece;
  box.textContent = stats.transcript;
  box.scrollTop = box.scrollHeight;
}

function showSessionInfo(meta) {
  stats.session = meta.session;
  $('session-info').textContent = `session ${meta.session} · slot ${meta.slot} · ${meta.mode}`;
  setState('live', `Connected (session ${meta.session}): speak`);
  ttt.every = meta.telemetry_every ?? null;
  $('ttt-info').textContent = ttt.every ? `every ${ttt.every} frames ` +
    `(${(ttt.every / FRAME_RATE).toFixed(2)} s)` : '';
  showTelemetryText();
}

// -- TTT learning ------------------------------------------------------------------------------

const plot = new TelemetryPlot($('ttt-plot'), FRAME_RATE);
const fmtValue = (v) => (Number.isFinite(v) ? v.toPrecision(3) : '—');

function addTelemetry(point) {
  ttt.telemetry.push(point);
  showTelemetryText();
  plot.schedule(); // one redraw per animation frame, however many points came meanwhile
}

/** A new session: its own points only. The array is emptied in place, so that it stays the
 * plot's (and window.moshiTTT's) array. */
function resetTelemetry() {
  ttt.every = null;
  ttt.telemetry.length = 0;
  $('ttt-info').textContent = '';
  showTelemetryText();
  plot.schedule();
}

/** The latest point's figures (per-layer ones in the tooltip), or why there is none. */
function showTelemetryText() {
  const p = ttt.telemetry.at(-1);
  const empty = $('ttt-empty');
  empty.hidden = Boolean(p);
  empty.textContent = ttt.every === 0 ? 'telemetry off' : 'no telemetry yet';
  $('ttt-loss').textContent = p ? `${fmtValue(p.inner_loss_before)} → ` +
    `${fmtValue(p.inner_loss_after)}` : '—';
  $('ttt-loss').title = p?.layers ? p.layers.map((l) => `layer ${l.layer}: ` +
    `${fmtValue(l.inner_loss_before)} → ${fmtValue(l.inner_loss_after)}, drift ` +
    `${fmtValue(l.drift)}`).join('\n') : '';
  $('ttt-drift').textContent = p ? fmtValue(p.drift) : '—';
  $('ttt-frames').textContent = p ? `${p.frame} (${(p.frame / FRAME_RATE).toFixed(1)} s)` : '—';
  $('ttt-frames').title = p ? `${ttt.telemetry.length} points, ${p.window_frames} frames each` +
    (Number.isFinite(p.input_dependence) ? `; input dependence ` +
      `${fmtValue(p.input_dependence)}` : '') : '';
}

function showLevel(el, peak) {
  const db = 20 * Math.log10(Math.max(peak, 1e-6)); // -60 dBFS .. 0 dBFS across the bar
  el.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
}

function renderCounters() {
  $('stat-sent').textContent = stats.framesSent;
  $('stat-received').textContent = stats.framesReceived;
  $('stat-buffer').textContent = `${Math.round(stats.bufferMs)} ms`;
  $('stat-underruns').textContent = stats.underruns;
  $('buffer-level').style.width = `${Math.min(100, (100 * stats.bufferMs) / PLAYER.maxMs)}%`;
}

$('connect-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (session) {
    session.stop();
    return;
  }
  Object.assign(stats, {
    mode: $('encoding').value, session: null, framesSent: 0, framesReceived: 0, bufferMs: 0,
    underruns: 0, droppedMs: 0, playedMs: 0, transcript: '', errors: [], closeCode: null,
    closeReason: '',
  });
  $('error').hidden = true;
  $('transcript').textContent = '';
  $('session-info').textContent = '';
  resetTelemetry();
  const s = (session = new Session(stats.mode, $('api-key').value.trim()));
  setButton(true);
  try {
    await s.start();
  } catch (err) {
    s.ended = true;
    s.cleanup();
    if (session === s) { // not already ended by a click on Disconnect
      showError(err.message);
      sessionEnded('error', 'Not connected');
    }
  }
});

// -- /health -----------------------------------------------------------------------------------

let healthInFlight = false;

async function refreshHealth() {
  if (healthInFlight) return;
  healthInFlight = true;
  try {
    const r = await fetch(new URL('health', document.baseURI), { cache: 'no-store' });
    const body = await r.json().catch(() => null); // 503 while loading is JSON too
    if (!body) throw new Error(`HTTP ${r.status}`);
    renderHealth(body);
  } catch (e) {
    renderHealth(null, `server unreachable (${e.message})`);
  } finally {
    healthInFlight = false;
  }
}

const fmtCount = (n) => {
  if (n == null) return '—';
  for (const [div, unit] of [[1e9, 'B'], [1e6, 'M'], [1e3, 'k']]) {
    if (n >= div) return `${(n / div).toPrecision(3)} ${unit}`;
  }
  return String(n);
};

const fmtStack = (s) => (s ? `d_model ${s.d_model} · ${s.num_heads} heads · ` +
  `${s.num_layers} layers` : '—');

function renderHealth(h, failure) {
  const set = (id, text, title = '') => {
    $(id).textContent = text;
    $(id).title = title;
  };
  const badge = $('server-badge');
  $('health-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  if (!h) {
    badge.dataset.state = 'down';
    badge.textContent = 'server unreachable';
    set('health-status', failure);
    return;
  }
  badge.dataset.state = h.status === 'ok' ? 'ok' : h.status === 'failed' ? 'down' : 'loading';
  badge.textContent = h.status === 'ok' ? `ready · ${h.device}` : `server ${h.status}`;
  set('health-status', h.status === 'ok' ? 'ready' : `${h.status}: ${h.reason || ''}`);
  const m = h.model || {};
  set('health-main', fmtStack(m.main), m.main ? `context ${m.main.context} frames` : '');
  set('health-depformer', fmtStack(m.depformer));
  const t = m.ttt;
  set('health-ttt', t ? `layers ${t.layers.join(', ') || 'none'} · K = ${t.mini_batch_size} · ` +
    `${t.num_heads} heads × ${t.head_dim}` : '—', t ? `inner MLP hidden ${t.mlp_hidden}, ` +
    `base lr ${t.base_lr}` : '');
  const p = m.params;
  set('health-params', p ? `${fmtCount(p.total)} total · ${fmtCount(p.ttt_total)} TTT` : '—',
    p ? Object.entries(p).map(([k, v]) => `${k}: ${v.toLocaleString('en-US')}`).join('\n') : '');
  const c = h.codec || {};
  set('health-codec', c.sample_rate ? `${c.sample_rate / 1000} kHz · ${c.frame_rate} Hz · ` +
    `${c.codebooks} codebooks` : '—');
  set('health-device', `${h.device} · ${h.dtype}`);
  set('health-sessions', h.sessions ? `${h.sessions.active} / ${h.sessions.capacity} active` :
    '—');
  const ck = h.checkpoint || {};
  set('health-checkpoint', ck.id ? `${ck.id} (${ck.kind}, step ${ck.step})` : ck.path || '—',
    ck.path || '');
}

// -- start-up ----------------------------------------------------------------------------------

opusSupported().then((ok) => {
  const opt = $('encoding').querySelector('option[value="opus"]');
  opt.disabled = !ok;
  opt.textContent = ok ? 'Opus (WebCodecs), 64 kbit/s' : 'Opus (not available in this browser)';
});
plot.show(ttt.telemetry);
refreshHealth();
setInterval(refreshHealth, HEALTH_EVERY_MS);
setInterval(renderCounters, 200);
