// Audio for the page: Opus decoding (WebCodecs AudioDecoder) into Web Audio
// through a small jitter buffer, and recording (getUserMedia, WebCodecs
// AudioEncoder, 20 ms Opus frames) with a waveform preview.

/** How far behind the first frame's arrival playback starts: the jitter
 * buffer. Frames are scheduled at `start + index × frame_ms`; a frame that
 * arrives after its time is dropped (the clip stays in step). */
export const JITTER_MS = 120;
const RATE = 48000;

let context = null;
/** The page's one AudioContext (made on first use). */
export function audioContext() {
  if (!context) context = new AudioContext({ sampleRate: RATE, latencyHint: 'interactive' });
  return context;
}

function opusConfig(header) {
  // Opus decoders open at 48 kHz or one of the four lower Opus rates (§5).
  const rates = [8000, 12000, 16000, 24000, 48000];
  return {
    codec: 'opus',
    sampleRate: rates.includes(header.sampleRate) ? header.sampleRate : RATE,
    numberOfChannels: header.channels,
  };
}

/** Decodes one clip's Opus frames as they come and, if `play`, plays them
 * through the jitter buffer. `samples` counts decoded samples per channel. */
export class ClipPlayer {
  constructor(header, { play = true, onSamples = () => {} } = {}) {
    this.header = header;
    this.play = play;
    this.samples = 0;
    this.dropped = 0;
    this.onSamples = onSamples;
    this.start = null;
    this.frameUs = header.frameMs * 1000;
    this.done = new Promise(resolve => { this.resolveDone = resolve; });
    this.decoder = new AudioDecoder({
      output: data => this.output(data),
      error: e => { this.error = e; },
    });
    this.decoder.configure(opusConfig(header));
  }

  /** Feeds frame `index` (its media time is index × frame_ms). */
  push(index, data) {
    if (this.decoder.state !== 'configured') return;
    this.decoder.decode(new EncodedAudioChunk({ type: 'key', timestamp: index * this.frameUs, data }));
  }

  /** No more frames: waits until everything is decoded. */
  async finish() {
    if (this.decoder.state === 'configured') {
      try { await this.decoder.flush(); } catch (e) { this.error = e; }
      this.decoder.close();
    }
    return this.samples;
  }

  /** Drops the clip (reset, cut). */
  abort() {
    if (this.decoder.state !== 'closed') this.decoder.close();
    for (const s of this.sources || []) { try { s.stop(); } catch { /* already ended */ } }
  }

  output(data) {
    const frames = data.numberOfFrames;
    this.samples += frames;
    this.onSamples(this.samples);
    if (this.play) this.schedule(data);
    data.close();
  }

  schedule(data) {
    const ctx = audioContext();
    const channels = data.numberOfChannels;
    const buffer = ctx.createBuffer(channels, data.numberOfFrames, data.sampleRate);
    for (let c = 0; c < channels; c++) {
      const plane = new Float32Array(data.numberOfFrames);
      data.copyTo(plane, { planeIndex: c, format: 'f32-planar' });
      buffer.copyToChannel(plane, c);
    }
    const media = data.timestamp / 1e6;
    if (this.start === null) this.start = ctx.currentTime + JITTER_MS / 1000 - media;
    const at = this.start + media;
    if (at < ctx.currentTime) { this.dropped += 1; return; }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    source.start(at);
    (this.sources ||= []).push(source);
    source.onended = () => { this.sources = this.sources.filter(s => s !== source); };
  }
}

/** Records from the microphone and hands out 20 ms Opus packets as they
 * are encoded, with a loudness value per packet for the waveform. */
export class Recorder {
  constructor({ onPacket, onError }) {
    this.onPacket = onPacket;
    this.onError = onError;
    this.stream = null;
    this.encoder = null;
    this.levels = [];
    this.sampleRate = RATE;
    this.channels = 1;
  }

  /** Asks for the microphone (once; kept for the next clips). */
  async open() {
    if (this.stream) return;
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
  }

  /** The microphone's sample rate (48000 when the browser does not say). */
  captureRate() {
    const settings = this.stream ? this.stream.getAudioTracks()[0].getSettings() : {};
    return settings.sampleRate || RATE;
  }

  /** Starts recording; packets go to `onPacket(data, level)`. */
  async start() {
    await this.open();
    if (typeof MediaStreamTrackProcessor === 'undefined') throw new Error('this browser cannot read the microphone frame by frame (MediaStreamTrackProcessor)');
    const track = this.stream.getAudioTracks()[0].clone();
    this.track = track;
    this.levels = [];
    this.pending = [];
    const processor = new MediaStreamTrackProcessor({ track });
    this.reader = processor.readable.getReader();
    this.encoder = null;
    this.running = this.pump();
  }

  async pump() {
    for (;;) {
      const { value: data, done } = await this.reader.read();
      if (done) return;
      try {
        if (!this.encoder) this.configure(data);
        const mono = toMono(data);
        this.level(mono);
        this.encoder.encode(mono);
        if (mono !== data) mono.close();
      } catch (e) {
        this.onError(e);
      } finally {
        data.close();
      }
    }
  }

  configure(data) {
    this.sampleRate = data.sampleRate;
    this.encoder = new AudioEncoder({
      output: chunk => {
        const bytes = new Uint8Array(chunk.byteLength);
        chunk.copyTo(bytes);
        const level = this.pending.length ? this.pending.shift() : 0;
        this.levels.push(level);
        this.onPacket(bytes);
      },
      error: e => this.onError(e),
    });
    this.encoder.configure({
      codec: 'opus', sampleRate: data.sampleRate, numberOfChannels: 1, bitrate: 24000,
      opus: { frameDuration: 20000, application: 'voip' },
    });
  }

  level(data) {
    // Peak per 20 ms of input, queued for the packets that come out.
    const plane = new Float32Array(data.numberOfFrames);
    data.copyTo(plane, { planeIndex: 0, format: 'f32-planar' });
    const per = Math.round(this.sampleRate / 50);
    for (let i = 0; i < plane.length; i += per) {
      let peak = 0;
      for (let j = i; j < Math.min(plane.length, i + per); j++) peak = Math.max(peak, Math.abs(plane[j]));
      this.pending.push(peak);
    }
  }

  /** Stops recording; resolves when the last packet was handed out. */
  async stop() {
    if (!this.reader) return;
    this.track.stop();
    await this.reader.cancel().catch(() => {});
    await this.running;
    if (this.encoder && this.encoder.state === 'configured') {
      await this.encoder.flush();
      this.encoder.close();
    }
    this.reader = null;
  }

  /** The clip's waveform: at most 256 buckets, 0 (silence) to 31 (loud). */
  waveform() { return waveform(this.levels); }
}

function toMono(data) {
  if (data.numberOfChannels === 1 && data.format === 'f32-planar') return data;
  const plane = new Float32Array(data.numberOfFrames);
  data.copyTo(plane, { planeIndex: 0, format: 'f32-planar' });
  return new AudioData({
    format: 'f32-planar', sampleRate: data.sampleRate, numberOfFrames: data.numberOfFrames,
    numberOfChannels: 1, timestamp: data.timestamp, data: plane,
  });
}

/** Peaks (0..1) per packet to at most 256 buckets of 0..31, on a log scale
 * like the relay's previews. */
export function waveform(levels) {
  const buckets = Math.min(256, levels.length);
  const out = new Uint8Array(buckets);
  for (let b = 0; b < buckets; b++) {
    const from = Math.floor(b * levels.length / buckets);
    const to = Math.max(from + 1, Math.floor((b + 1) * levels.length / buckets));
    let peak = 0;
    for (let i = from; i < to; i++) peak = Math.max(peak, levels[i]);
    const db = 20 * Math.log10(Math.max(peak, 1e-5));
    out[b] = Math.max(0, Math.min(31, Math.round((db + 60) / 60 * 31)));
  }
  return out;
}

/** Draws a waveform (bytes 0..31) into a canvas. */
export function drawWaveform(canvas, wave, color = '#2b6cb0') {
  const g = canvas.getContext('2d');
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  if (!wave || !wave.length) return;
  const w = width / wave.length;
  g.fillStyle = color;
  wave.forEach((v, i) => {
    const h = Math.max(1, (v / 31) * height);
    g.fillRect(i * w, (height - h) / 2, Math.max(1, w - 1), h);
  });
}
