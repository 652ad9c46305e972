// The wire format of PROTOCOL.md, written from the document (a second,
// independent implementation next to the Rust crate `ptt-protocol`):
// varints (§2.2), frames (§2.1), the control messages a page sends and
// receives (§4), the clip stream messages (§5) and the error codes (§6).

export const VERSION = 1;
/** Largest payload of any message (§7). */
export const MAX_PAYLOAD = 65536;

export const T = {
  Hello: 0x01, Join: 0x02, Leave: 0x03, FloorRequest: 0x04, FloorRelease: 0x05,
  DeliveryAck: 0x06, Played: 0x07, FetchRecent: 0x08, ListGroups: 0x13, ListMembers: 0x15,
  Welcome: 0x20, Ok: 0x21, Error: 0x22, Joined: 0x23, CaughtUp: 0x24, Gap: 0x25,
  Stored: 0x26, ClipRejected: 0x27, Receipt: 0x28, FloorGranted: 0x29, FloorDenied: 0x2a,
  FloorTaken: 0x2b, FloorIdle: 0x2c, FloorRevoked: 0x2d, GroupList: 0x2e, MemberList: 0x2f,
  FetchDone: 0x30, GroupLeft: 0x31, ClipDeleted: 0x34, GoAway: 0x36,
  ClipHeader: 0x38, ClipFrame: 0x39, ClipEnd: 0x3a,
};

export const MODE = { 1: 'walkie', 2: 'notes' };
export const FLAG_HISTORY = 0x01, FLAG_EMERGENCY = 0x02, FLAG_FETCHED = 0x04;
export const FORMAT_OPUS = 1;

/** Error codes (§6), with the words the page shows. */
export const ERRORS = {
  0: ['None', 'closed'],
  1: ['Protocol', 'protocol error'],
  2: ['UnsupportedVersion', 'this relay speaks another protocol version'],
  3: ['InvalidToken', 'the token is not valid'],
  4: ['TokenExpired', 'the token has expired: get a new one'],
  5: ['AuthTimeout', 'sign-in took too long'],
  6: ['NotMember', 'you are not a member of that group'],
  7: ['NoSuchGroup', 'no such group'],
  8: ['Forbidden', 'your token does not allow that'],
  9: ['FloorTaken', 'someone else is talking'],
  10: ['TooLarge', 'too large'],
  11: ['RateLimited', 'too many requests: slow down'],
  12: ['TooManyClips', 'too many clips at once'],
  13: ['ClipTooLong', 'the clip was too long'],
  14: ['OutOfOrder', 'the clip was damaged'],
  15: ['SlowReceiver', 'the connection was too slow'],
  16: ['ClipAborted', 'the talker stopped'],
  17: ['Duplicate', 'already stored'],
  18: ['Internal', 'the relay failed: try again later'],
  19: ['ShuttingDown', 'the relay is restarting'],
  20: ['GroupExists', 'the group exists'],
  21: ['TranscodeFailed', 'the recording could not be converted'],
  22: ['Preempted', 'an emergency talker took the floor'],
  23: ['TooManyConnections', 'the relay is full: try again later'],
  24: ['InvalidRequest', 'invalid request'],
};

export function errorName(code) { return (ERRORS[code] || ['Unknown'])[0]; }
export function errorWords(code) { return (ERRORS[code] || [null, `error ${code}`])[1]; }

/** Codes after which reconnecting without a user's action is pointless (§6). */
export const FATAL = new Set([2, 3, 4]);

export class DecodeError extends Error {}

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** Appends fields to a growing byte array. */
export class Writer {
  constructor() { this.bytes = []; }
  varint(v) {
    // Shortest form (§2.2). Values here stay below 2^53.
    if (v < 0 || !Number.isSafeInteger(v)) throw new RangeError(`varint ${v}`);
    if (v < 0x40) this.bytes.push(v);
    else if (v < 0x4000) this.bytes.push(0x40 | (v >> 8), v & 0xff);
    else if (v < 0x40000000) this.bytes.push(0x80 | (v >>> 24), (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff);
    else {
      let big = BigInt(v) | (3n << 62n);
      const out = [];
      for (let i = 0; i < 8; i++) { out.unshift(Number(big & 0xffn)); big >>= 8n; }
      this.bytes.push(...out);
    }
    return this;
  }
  u8(v) { this.bytes.push(v & 0xff); return this; }
  bool(v) { return this.u8(v ? 1 : 0); }
  raw(b) { for (const x of b) this.bytes.push(x); return this; }
  bytesField(b) { this.varint(b.length); return this.raw(b); }
  string(s) { return this.bytesField(encoder.encode(s)); }
  toBytes() { return Uint8Array.from(this.bytes); }
}

/** Reads fields from one payload; running past its end is a DecodeError. */
export class Reader {
  constructor(bytes) { this.b = bytes; this.pos = 0; }
  need(n) { if (this.pos + n > this.b.length) throw new DecodeError('payload ends inside its fields'); }
  varint() {
    this.need(1);
    const first = this.b[this.pos];
    const len = 1 << (first >> 6);
    this.need(len);
    let v = BigInt(first & 0x3f);
    for (let i = 1; i < len; i++) v = (v << 8n) | BigInt(this.b[this.pos + i]);
    this.pos += len;
    return Number(v);
  }
  u8() { this.need(1); return this.b[this.pos++]; }
  bool() {
    const v = this.u8();
    if (v > 1) throw new DecodeError('bool out of range');
    return v === 1;
  }
  raw(n) { this.need(n); const out = this.b.subarray(this.pos, this.pos + n); this.pos += n; return out; }
  bytesField() { return this.raw(this.varint()); }
  string() { return decoder.decode(this.bytesField()); }
  clipId() { return this.raw(16).slice(); }
  list(item) {
    const n = this.varint();
    if (n > 4096) throw new DecodeError('list too long');
    const out = [];
    for (let i = 0; i < n; i++) out.push(item(this));
    return out;
  }
}

/** One frame: type, length, payload (§2.1). */
export function frame(type, payload) {
  return new Writer().varint(type).varint(payload.length).raw(payload).toBytes();
}

const msg = (type, build) => { const w = new Writer(); build(w); return frame(type, w.toBytes()); };

export const encode = {
  hello: (token, client) => msg(T.Hello, w => w.varint(VERSION).string(token).string(client)),
  join: (id, group) => msg(T.Join, w => w.varint(id).string(group)),
  leave: (id, group) => msg(T.Leave, w => w.varint(id).string(group)),
  floorRequest: (id, group, emergency) => msg(T.FloorRequest, w => w.varint(id).string(group).bool(emergency)),
  floorRelease: (group) => msg(T.FloorRelease, w => w.string(group)),
  deliveryAck: (group, seq) => msg(T.DeliveryAck, w => w.string(group).varint(seq)),
  played: (group, seq) => msg(T.Played, w => w.string(group).varint(seq)),
  fetchRecent: (id, group, count) => msg(T.FetchRecent, w => w.varint(id).string(group).varint(count)),
  listGroups: (id) => msg(T.ListGroups, w => w.varint(id)),
  clipHeader: (h) => msg(T.ClipHeader, w => w.string(h.group).raw(h.clipId).string(h.talker || '')
    .varint(h.seq || 0).u8(h.format).varint(h.sampleRate).u8(h.channels).u8(h.frameMs)
    .varint(h.createdMs).u8(h.flags || 0)),
  clipFrame: (index, data) => msg(T.ClipFrame, w => w.varint(index).bytesField(data)),
  clipEnd: (frameCount, seq, waveform) => msg(T.ClipEnd, w => w.varint(frameCount).varint(seq).bytesField(waveform)),
};

/** Decodes a relay → client control message, or a clip message. Unknown
 * types come back as `{type, name: 'Unknown'}` (skipped on the control
 * stream, §2.1); so do the answers to requests the page never sends
 * (operators' MemberStatus and ClipList, channel answers). Bytes after the
 * last known field are ignored. */
export function decode(type, payload) {
  const r = new Reader(payload);
  switch (type) {
    case T.Welcome: return { name: 'Welcome', version: r.varint(), user: r.string(), serverTimeMs: r.varint(),
      maxClipMs: r.varint(), maxClipBytes: r.varint(), maxFrameBytes: r.varint(),
      maxConcurrentClips: r.varint(), clipsPerMinute: r.varint(), idleTimeoutMs: r.varint() };
    case T.Ok: return { name: 'Ok', requestId: r.varint() };
    case T.Error: return { name: 'Error', requestId: r.varint(), code: r.varint(), message: r.string() };
    case T.Joined: return { name: 'Joined', requestId: r.varint(), group: r.string(), mode: mode(r), cursor: r.varint(), lastSeq: r.varint() };
    case T.CaughtUp: return { name: 'CaughtUp', group: r.string(), seq: r.varint() };
    case T.Gap: return { name: 'Gap', group: r.string(), fromSeq: r.varint(), toSeq: r.varint() };
    case T.Stored: return { name: 'Stored', group: r.string(), clipId: r.clipId(), seq: r.varint() };
    case T.ClipRejected: return { name: 'ClipRejected', clipId: r.clipId(), code: r.varint(), message: r.string() };
    case T.Receipt: return { name: 'Receipt', group: r.string(), seq: r.varint(), clipId: r.clipId(), user: r.string(), kind: r.u8() === 2 ? 'played' : 'delivered' };
    case T.FloorGranted: return { name: 'FloorGranted', requestId: r.varint(), group: r.string(), maxMs: r.varint() };
    case T.FloorDenied: return { name: 'FloorDenied', requestId: r.varint(), group: r.string(), holder: r.string() };
    case T.FloorTaken: return { name: 'FloorTaken', group: r.string(), user: r.string(), emergency: r.bool() };
    case T.FloorIdle: return { name: 'FloorIdle', group: r.string() };
    case T.FloorRevoked: return { name: 'FloorRevoked', group: r.string(), code: r.varint() };
    case T.GroupList: return { name: 'GroupList', requestId: r.varint(), groups: r.list(x => ({ group: x.string(), mode: mode(x) })) };
    case T.MemberList: return { name: 'MemberList', requestId: r.varint(), group: r.string(), members: r.list(x => x.string()) };
    case T.FetchDone: return { name: 'FetchDone', requestId: r.varint(), group: r.string(), count: r.varint() };
    case T.GroupLeft: return { name: 'GroupLeft', group: r.string(), code: r.varint() };
    case T.ClipDeleted: return { name: 'ClipDeleted', group: r.string(), seq: r.varint(), clipId: r.clipId() };
    case T.GoAway: return { name: 'GoAway', reconnectAfterMs: r.varint(), address: r.string() };
    case T.ClipHeader: return { name: 'ClipHeader', group: r.string(), clipId: r.clipId(), talker: r.string(), seq: r.varint(),
      format: r.u8(), sampleRate: r.varint(), channels: r.u8(), frameMs: r.u8(), createdMs: r.varint(), flags: r.u8() };
    case T.ClipFrame: return { name: 'ClipFrame', index: r.varint(), data: r.bytesField().slice() };
    case T.ClipEnd: {
      const end = { name: 'ClipEnd', frameCount: r.varint(), seq: r.varint(), waveform: r.bytesField().slice() };
      if (end.waveform.length > 256) throw new DecodeError('waveform too long');
      return end;
    }
    default: return { name: 'Unknown', type };
  }
}

function mode(r) {
  const m = MODE[r.u8()];
  if (!m) throw new DecodeError('mode out of range');
  return m;
}

/** Cuts frames out of a WebTransport ReadableStream's chunks (one reader
 * per framing, as in the relay). `next()` gives `{type, payload}` or null
 * at the end of the stream; a frame cut short by the end is an error. */
export class FrameReader {
  constructor(readable, maxPayload = MAX_PAYLOAD) {
    this.reader = readable.getReader();
    this.buf = new Uint8Array(0);
    this.max = maxPayload;
  }
  async next() {
    for (;;) {
      const cut = this.cut();
      if (cut) return cut;
      const { value, done } = await this.reader.read();
      if (done) {
        if (this.buf.length) throw new DecodeError('stream ended inside a frame');
        return null;
      }
      const joined = new Uint8Array(this.buf.length + value.length);
      joined.set(this.buf); joined.set(value, this.buf.length);
      this.buf = joined;
    }
  }
  cut() {
    const r = new Reader(this.buf);
    try {
      const type = r.varint();
      const len = r.varint();
      if (len > this.max) throw new DecodeError(`frame of ${len} bytes is too large`);
      const payload = r.raw(len).slice();
      this.buf = this.buf.subarray(r.pos);
      return { type, payload };
    } catch (e) {
      if (e instanceof DecodeError && e.message === 'payload ends inside its fields') return null;
      throw e;
    }
  }
  cancel(reason) { return this.reader.cancel(reason).catch(() => {}); }
}

export function hex(bytes) { return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join(''); }
export function fromHex(s) { return Uint8Array.from(s.match(/../g) || [], h => parseInt(h, 16)); }
