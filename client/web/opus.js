// Ogg/Opus for the server's `opus` mode, with the browser's own codec (WebCodecs): the server
// speaks Ogg pages (RFC 3533) holding Opus packets (RFC 7845) both ways, WebCodecs speaks bare
// Opus packets, so this file muxes and demuxes the Ogg layer. No library, nothing to vendor.

const MODEL_RATE = 24000;
const ENCODER_CONFIG = {
  codec: 'opus',
  sampleRate: MODEL_RATE,
  numberOfChannels: 1,
  bitrate: 64000, // still 12x less than float32 PCM; keeps the model's input close to the mic
  opus: { frameDuration: 20000, application: 'voip' }, // 20 ms packets: low added latency
};
const DECODER_CONFIG = { codec: 'opus', sampleRate: MODEL_RATE, numberOfChannels: 1 };

/** Whether this browser can encode and decode Opus with WebCodecs (needs a secure context). */
export async function opusSupported() {
  if (typeof AudioEncoder === 'undefined' || typeof AudioDecoder === 'undefined') return false;
  try {
    const [enc, dec] = await Promise.all([
      AudioEncoder.isConfigSupported(ENCODER_CONFIG),
      AudioDecoder.isConfigSupported(DECODER_CONFIG),
    ]);
    return Boolean(enc.supported && dec.supported);
  } catch {
    return false;
  }
}

// -- Ogg pages ---------------------------------------------------------------------------------

// Ogg's CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor.
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    t[i] = r >>> 0;
  }
  return t;
})();

function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc;
}

const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** Writes one logical Ogg/Opus stream, one packet per page so that nothing waits for a page
 * to fill up. */
export class OggOpusWriter {
  constructor(channels = 1, inputRate = MODEL_RATE) {
    this.serial = crypto.getRandomValues(new Uint32Array(1))[0];
    this.sequence = 0;
    this.granule = 0n; // Ogg/Opus granule positions always count 48 kHz samples
    this.channels = channels;
    this.inputRate = inputRate;
  }

  /** The two header pages (OpusHead, OpusTags) that must open the stream. */
  headers() {
    const head = new Uint8Array(19);
    const v = new DataView(head.buffer);
    head.set(ascii('OpusHead'));
    head[8] = 1; // version
    head[9] = this.channels;
    v.setUint16(10, 312, true); // pre-skip: libopus' encoder look-ahead at 48 kHz
    v.setUint32(12, this.inputRate, true);
    v.setInt16(16, 0, true); // output gain
    head[18] = 0; // channel mapping family 0: mono or stereo
    const vendor = ascii('moshi-ttt web client (WebCodecs)');
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    const tv = new DataView(tags.buffer);
    tags.set(ascii('OpusTags'));
    tv.setUint32(8, vendor.length, true);
    tags.set(vendor, 12);
    tv.setUint32(12 + vendor.length, 0, true); // no user comments
    return [this.page(head, 0x02), this.page(tags, 0)];
  }

  /** A page holding one Opus packet that decodes to `samples48k` samples at 48 kHz. */
  packet(data, samples48k) {
    this.granule += BigInt(samples48k);
    return this.page(data, 0);
  }

  page(body, headerType) {
    const lacing = Math.floor(body.length / 255) + 1; // a last value < 255 ends the packet
    if (lacing > 255) throw new Error(`Opus packet of ${body.length} bytes is too large`);
    const page = new Uint8Array(27 + lacing + body.length);
    const v = new DataView(page.buffer);
    page.set(ascii('OggS'));
    page[4] = 0; // stream structure version
    page[5] = headerType;
    v.setBigUint64(6, this.granule, true);
    v.setUint32(14, this.serial, true);
    v.setUint32(18, this.sequence++, true);
    page[26] = lacing;
    page.fill(255, 27, 27 + lacing - 1);
    page[27 + lacing - 1] = body.length % 255;
    page.set(body, 27 + lacing);
    v.setUint32(22, oggCrc(page), true); // computed with the CRC field still zero
    return page;
  }
}

/** Turns a byte stream of Ogg pages (cut anywhere) back into packets. */
export class OggReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet that continues on the next page
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer);
    joined.set(bytes, this.buffer.length);
    const packets = [];
    let off = 0;
    while (joined.length - off >= 27) {
      if (joined[off] !== 0x4f || joined[off + 1] !== 0x67 || joined[off + 2] !== 0x67 ||
          joined[off + 3] !== 0x53) {
        throw new Error('malformed Ogg stream from the server (no OggS capture pattern)');
      }
      const nseg = joined[off + 26];
      if (joined.length - off < 27 + nseg) break;
      const lacing = joined.subarray(off + 27, off + 27 + nseg);
      const bodyLen = lacing.reduce((a, b) => a + b, 0);
      if (joined.length - off < 27 + nseg + bodyLen) break; // the rest of the page comes later
      let p = off + 27 + nseg;
      for (const len of lacing) {
        this.partial.push(joined.subarray(p, p + len));
        p += len;
        if (len < 255) {
          packets.push(concat(this.partial));
          this.partial = [];
        }
      }
      off = p;
    }
    this.buffer = joined.slice(off);
    return packets;
  }
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((a, b) => a + b.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const startsWith = (bytes, magic) =>
  bytes.length >= magic.length && magic.split('').every((c, i) => bytes[i] === c.charCodeAt(0));

// -- WebCodecs ---------------------------------------------------------------------------------

/** Microphone frames (Float32Array at 24 kHz) -> Ogg pages, handed to `onPage(bytes, samples)`
 * where `samples` is the 24 kHz audio the page holds (0 for headers). */
export class OpusSender {
  constructor(onPage, onError) {
    this.ogg = new OggOpusWriter();
    this.timestamp = 0; // microseconds of audio handed to the encoder
    this.onPage = onPage;
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const data = new Uint8Array(chunk.byteLength);
        chunk.copyTo(data);
        const us = chunk.duration ?? ENCODER_CONFIG.opus.frameDuration;
        this.onPage(this.ogg.packet(data, Math.round((us * 48000) / 1e6)),
          Math.round((us * MODEL_RATE) / 1e6));
      },
      error: (e) => onError(`Opus encoder failed: ${e.message}`),
    });
    this.encoder.configure(ENCODER_CONFIG);
    for (const page of this.ogg.headers()) this.onPage(page, 0);
  }

  encode(frame) {
    if (this.encoder.state !== 'configured') return;
    const data = new AudioData({
      format: 'f32-planar', sampleRate: MODEL_RATE, numberOfChannels: 1,
      numberOfFrames: frame.length, timestamp: this.timestamp, data: frame,
    });
    this.timestamp += Math.round((frame.length * 1e6) / MODEL_RATE);
    this.encoder.encode(data);
    data.close();
  }

  close() {
    if (this.encoder.state !== 'closed') this.encoder.close();
  }
}

/** Ogg/Opus bytes from the server -> `onPcm(Float32Array, sampleRate)`. */
export class OpusReceiver {
  constructor(onPcm, onError) {
    this.ogg = new OggReader();
    this.onPcm = onPcm;
    this.onError = onError;
    this.decoder = null; // configured from the stream's OpusHead
    this.timestamp = 0;
  }

  push(bytes) {
    for (const packet of this.ogg.push(bytes)) {
      if (startsWith(packet, 'OpusHead')) {
        this.configure(packet);
      } else if (startsWith(packet, 'OpusTags')) {
        continue;
      } else if (!this.decoder) {
        throw new Error('Opus audio from the server before its OpusHead header');
      } else {
        // Timestamps only need to increase; the decoder reports each packet's real duration.
        this.decoder.decode(new EncodedAudioChunk({
          type: 'key', timestamp: this.timestamp, data: packet,
        }));
        this.timestamp += 20000;
      }
    }
  }

  configure(head) {
    this.close();
    this.decoder = new AudioDecoder({
      output: (audio) => {
        const pcm = new Float32Array(audio.numberOfFrames);
        audio.copyTo(pcm, { planeIndex: 0, format: 'f32-planar' });
        const rate = audio.sampleRate;
        audio.close();
        this.onPcm(pcm, rate);
      },
      error: (e) => this.onError(`Opus decoder failed: ${e.message}`),
    });
    this.decoder.configure({ ...DECODER_CONFIG, numberOfChannels: head[9], description: head });
  }

  close() {
    if (this.decoder && this.decoder.state !== 'closed') this.decoder.close();
  }
}
