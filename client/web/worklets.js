// AudioWorklet processors of the browser client: microphone capture and jittered playback.
// Both run on the audio rendering thread; they talk to app.js only through their ports.

const MODEL_RATE = 24000; // the server's sample rate (protocol.SAMPLE_RATE)
const FRAME_SIZE = 1920; // one 80 ms model frame at 24 kHz (protocol.FRAME_SIZE)

// Streaming linear-interpolation resampler. Only used when the AudioContext could not be opened
// at 24 kHz (Chromium and Safari honour {sampleRate: 24000}, so there it is a no-op); linear is
// enough for a speech codec whose band ends well below either Nyquist.
class LinearResampler {
  constructor(fromRate, toRate) {
    this.step = fromRate / toRate; // input samples per output sample
    this.t = 0; // next output position, in input samples from the start of the next chunk
    this.prev = 0; // last input sample of the previous chunk (position -1)
  }

  process(input) {
    if (this.step === 1) return input;
    const out = new Float32Array(Math.ceil((input.length + 1) / this.step) + 1);
    let n = 0;
    let t = this.t;
    while (t < input.length - 1) {
      const i = Math.floor(t);
      const a = i < 0 ? this.prev : input[i];
      out[n++] = a + (input[i + 1] - a) * (t - i);
      t += this.step;
    }
    this.prev = input[input.length - 1];
    this.t = t - input.length;
    return out.subarray(0, n);
  }
}

// Microphone -> 80 ms frames at 24 kHz, posted as transferable Float32Arrays, plus an input level
// for the meter. It has no outputs: nothing of the microphone is ever played back.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new LinearResampler(sampleRate, MODEL_RATE);
    this.frame = new Float32Array(FRAME_SIZE);
    this.filled = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet (or the track ended): keep the node alive
    const pcm = this.resampler.process(channel);
    for (let i = 0; i < pcm.length; i++) {
      const x = pcm[i];
      this.frame[this.filled++] = x;
      const a = Math.abs(x);
      if (a > this.peak) this.peak = a;
      if (this.filled === FRAME_SIZE) {
        this.port.postMessage({ frame: this.frame, peak: this.peak }, [this.frame.buffer]);
        this.frame = new Float32Array(FRAME_SIZE);
        this.filled = 0;
        this.peak = 0;
      }
    }
    return true;
  }
}

// Playback through a ring-buffer jitter buffer. Network and model steps arrive in bursts; playing
// starts once `startMs` is buffered, an underrun plays silence and re-buffers to `startMs`, and a
// backlog beyond `maxMs` (e.g. after a stall the model caught up) is cut back to `startMs`, so the
// conversation's latency stays bounded. Depth and counters are reported every ~100 ms.
class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.startSamples = Math.round(((opts.startMs ?? 160) / 1000) * sampleRate);
    this.maxSamples = Math.round(((opts.maxMs ?? 1000) / 1000) * sampleRate);
    this.ring = new Float32Array(Math.max(this.maxSamples * 2, sampleRate * 4));
    this.read = 0;
    this.write = 0;
    this.depth = 0;
    this.playing = false;
    this.underruns = 0;
    this.droppedSamples = 0;
    this.played = 0;
    this.resamplers = new Map(); // source rate -> resampler (Opus may decode at 48 kHz)
    this.lastReport = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === 'push') {
      let r = this.resamplers.get(msg.rate);
      if (!r) this.resamplers.set(msg.rate, (r = new LinearResampler(msg.rate, sampleRate)));
      this.push(r.process(msg.samples));
    }
  }

  push(pcm) {
    const cap = this.ring.length;
    for (let i = 0; i < pcm.length; i++) {
      this.ring[this.write] = pcm[i];
      this.write = (this.write + 1) % cap;
    }
    this.depth += pcm.length;
    if (this.depth > this.maxSamples || this.depth > cap) {
      const drop = this.depth - this.startSamples;
      this.read = (this.read + drop) % cap;
      this.depth -= drop;
      this.droppedSamples += drop;
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.depth >= this.startSamples) this.playing = true;
    let i = 0;
    if (this.playing) {
      const cap = this.ring.length;
      const n = Math.min(out.length, this.depth);
      for (; i < n; i++) {
        out[i] = this.ring[this.read];
        this.read = (this.read + 1) % cap;
      }
      this.depth -= n;
      this.played += n;
      if (n < out.length) {
        this.playing = false; // underrun: silence now, then wait for startMs again
        this.underruns++;
      }
    }
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);

    if (currentTime - this.lastReport >= 0.1) {
      this.lastReport = currentTime;
      this.port.postMessage({
        depthMs: (1000 * this.depth) / sampleRate,
        playing: this.playing,
        underruns: this.underruns,
        droppedMs: (1000 * this.droppedSamples) / sampleRate,
        playedMs: (1000 * this.played) / sampleRate,
      });
    }
    return true;
  }
}

registerProcessor('moshi-capture', CaptureProcessor);
registerProcessor('moshi-player', PlayerProcessor);
