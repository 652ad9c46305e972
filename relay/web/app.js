// The push-to-talk page: signs in over WebTransport, lists the user's
// groups and their clips, plays clips live, talks while a button (or the
// space bar) is held, and reconnects by itself. Everything it knows is in
// `state` (exposed as `window.ptt.state` for tests and curious people).

import {
  T, FLAG_HISTORY, FLAG_FETCHED, FORMAT_OPUS, FATAL, FrameReader, decode, encode, errorName, errorWords, fromHex, hex,
} from './protocol.js';
import { ClipPlayer, Recorder, audioContext, drawWaveform } from './audio.js';

const CLIENT = 'ptt-web/1';
/** Clips kept per group (older ones drop out of the list). */
const MAX_CLIPS = 200;
const RECONNECT_MAX_MS = 15000;

export const state = {
  status: 'signed-out', // signed-out | connecting | connected | reconnecting
  user: null,
  groups: {}, // name -> { mode, joined, caughtUp, lastSeq, cursor, floor, clips: [] }
  selected: null,
  talk: { state: 'idle', group: null, frames: 0, error: null },
  messages: [], // what the user is told, newest last
  liveSamples: 0, // samples decoded from live clips
};

let token = null;
let session = null;
let reconnectAttempt = 0;
let reconnectTimer = null;
let recorder = null;
/** Uploads not yet answered by Stored or ClipRejected: resent on reconnect (§9.8). */
const unanswered = new Map();

// ---------------------------------------------------------------- messages

function tell(text, kind = 'error') {
  state.messages.push({ text, kind, at: Date.now() });
  if (state.messages.length > 20) state.messages.shift();
  render();
}

// ---------------------------------------------------------------- connection

async function connect() {
  clearTimeout(reconnectTimer);
  state.status = reconnectAttempt ? 'reconnecting' : 'connecting';
  render();
  let wt;
  try {
    const config = await (await fetch('/config.json', { cache: 'no-store' })).json();
    const url = `https://${location.hostname}:${config.port}${config.path}`;
    const options = {};
    if (config.certificate_hashes.length) {
      options.serverCertificateHashes = config.certificate_hashes.map(h => ({ algorithm: 'sha-256', value: fromHex(h) }));
    }
    wt = new WebTransport(url, options);
    await wt.ready;
    const { readable, writable } = await wt.createBidirectionalStream();
    const s = { wt, control: writable.getWriter(), reader: new FrameReader(readable), nextId: 1, pending: new Map(), clips: new Set() };
    await s.control.write(encode.hello(token, CLIENT));
    const first = await s.reader.next();
    const welcome = first && decode(first.type, first.payload);
    if (!welcome || welcome.name !== 'Welcome') {
      const code = welcome && welcome.name === 'Error' ? welcome.code : 1;
      wt.close();
      return failed(code, welcome && welcome.message);
    }
    session = s;
    reconnectAttempt = 0;
    state.status = 'connected';
    state.user = welcome.user;
    tell(`signed in as ${welcome.user}`, 'info');
    watchClose(s);
    controlLoop(s);
    clipLoop(s);
    await start(s);
  } catch (e) {
    if (wt) try { wt.close(); } catch { /* closed */ }
    session = null;
    tell(`cannot reach the relay: ${e.message || e}`);
    scheduleReconnect();
  }
}

async function start(s) {
  const list = await request(s, id => encode.listGroups(id));
  if (list.name !== 'GroupList') return tell(`cannot list groups: ${errorWords(list.code)}`);
  for (const { group, mode } of list.groups) {
    const g = groupState(group);
    g.mode = mode;
    if (g.left) continue;
    const joined = await request(s, id => encode.join(id, group));
    if (joined.name === 'Joined') {
      Object.assign(g, { joined: true, caughtUp: false, lastSeq: joined.lastSeq, cursor: joined.cursor, mode: joined.mode });
    } else {
      tell(`cannot join ${group}: ${errorWords(joined.code)}`);
    }
  }
  if (!state.selected && list.groups.length) state.selected = list.groups[0].group;
  render();
  // Clips recorded but never answered go again, under the same id.
  for (const upload of unanswered.values()) resend(s, upload);
}

function failed(code, message) {
  session = null;
  if (FATAL.has(code)) {
    state.status = 'signed-out';
    tell(`sign-in refused: ${errorWords(code)}${message ? ` (${message})` : ''}`);
    return;
  }
  tell(`disconnected: ${errorWords(code)}`);
  scheduleReconnect();
}

function watchClose(s) {
  s.wt.closed.then(
    info => onClosed(s, info.closeCode ?? 0, info.reason),
    e => onClosed(s, e.streamErrorCode ?? null, e.message),
  );
}

function onClosed(s, code, reason) {
  if (session !== s) return;
  session = null;
  for (const g of Object.values(state.groups)) { g.joined = false; g.floor = null; }
  if (state.talk.state !== 'idle') stopTalk(true);
  if (code !== null && FATAL.has(code)) return failed(code, reason);
  if (state.status === 'signed-out') return;
  tell(code ? `connection closed: ${errorWords(code)}` : 'connection lost');
  scheduleReconnect();
}

/** The relay's GoAway, if it sent one before the connection closed. */
let goAway = null;

function scheduleReconnect() {
  if (state.status === 'signed-out') return;
  state.status = 'reconnecting';
  const base = Math.min(RECONNECT_MAX_MS, 500 * 2 ** reconnectAttempt);
  reconnectAttempt += 1;
  let delay = base / 2 + Math.random() * base / 2;
  if (goAway) {
    // §9.14: the hint plus up to half of it again, then the usual back-off.
    delay = goAway.reconnectAfterMs * (1 + Math.random() / 2);
    goAway = null;
    reconnectAttempt = 0;
  }
  reconnectTimer = setTimeout(connect, delay);
  render();
}

function send(s, bytes) {
  return s.control.write(bytes).catch(() => {});
}

/** Sends a request and resolves with its answer (or an Error). */
function request(s, build) {
  const id = s.nextId++;
  return new Promise(resolve => {
    s.pending.set(id, resolve);
    send(s, build(id));
  });
}

async function controlLoop(s) {
  try {
    for (;;) {
      const f = await s.reader.next();
      if (!f) break;
      const m = decode(f.type, f.payload);
      onControl(s, m);
    }
  } catch (e) {
    if (session === s) tell(`control stream failed: ${e.message || e}`);
  }
}

function onControl(s, m) {
  if ('requestId' in m && m.requestId !== 0 && s.pending.has(m.requestId)) {
    const resolve = s.pending.get(m.requestId);
    s.pending.delete(m.requestId);
    resolve(m);
    return;
  }
  const g = m.group !== undefined ? groupState(m.group) : null;
  switch (m.name) {
    case 'Error': if (m.requestId === 0) tell(`the relay closes the connection: ${errorWords(m.code)}`); break;
    case 'CaughtUp': g.caughtUp = true; g.lastSeq = Math.max(g.lastSeq || 0, m.seq); break;
    case 'Gap': tell(`${m.group}: clips ${m.fromSeq}–${m.toSeq} expired before you got them`, 'info'); break;
    case 'Stored': onStored(m); break;
    case 'ClipRejected': onRejected(m); break;
    case 'Receipt': onReceipt(m); break;
    case 'FloorTaken': g.floor = { user: m.user, emergency: m.emergency }; break;
    case 'FloorIdle': g.floor = null; break;
    case 'FloorRevoked':
      tell(`${m.group}: you lost the floor: ${errorWords(m.code)}`);
      if (state.talk.group === m.group) stopTalk(true);
      break;
    case 'GroupLeft': g.joined = false; g.left = true; tell(`${m.group}: ${errorWords(m.code)}`); break;
    case 'ClipDeleted': g.clips = g.clips.filter(c => c.id !== hex(m.clipId)); break;
    // The relay is draining (§9.14): reconnect after its hint once it
    // closes. The page stays with the relay that served it (`address` is
    // for native clients behind a list of relays).
    case 'GoAway': goAway = m; tell('the relay is restarting: reconnecting', 'info'); break;
    default: break; // unknown types are skipped (§2.1)
  }
  render();
}

// ---------------------------------------------------------------- receiving

function groupState(name) {
  return state.groups[name] ||= { mode: 'notes', joined: false, caughtUp: false, lastSeq: 0, cursor: 0, floor: null, clips: [], left: false };
}

function addClip(group, clip) {
  const g = groupState(group);
  const i = g.clips.findIndex(c => c.id === clip.id);
  if (i >= 0) g.clips.splice(i, 1);
  g.clips.push(clip);
  g.clips.sort((a, b) => (a.seq || Infinity) - (b.seq || Infinity) || a.createdMs - b.createdMs);
  while (g.clips.length > MAX_CLIPS) g.clips.shift();
}

async function clipLoop(s) {
  const streams = s.wt.incomingUnidirectionalStreams.getReader();
  try {
    for (;;) {
      const { value, done } = await streams.read();
      if (done) return;
      receiveClip(s, value);
    }
  } catch { /* session closed */ }
}

async function receiveClip(s, readable) {
  const reader = new FrameReader(readable);
  let clip = null;
  let player = null;
  try {
    const first = await reader.next();
    const header = first && decode(first.type, first.payload);
    if (!header || header.name !== 'ClipHeader' || header.format !== FORMAT_OPUS) throw new Error('not a clip');
    const history = (header.flags & FLAG_HISTORY) !== 0;
    const existing = groupState(header.group).clips.find(c => c.id === hex(header.clipId));
    if (existing && existing.state === 'complete' && history) {
      // Already have it (its ack was lost): acknowledge again, keep one copy.
      await drain(reader);
      if (header.seq) send(s, encode.deliveryAck(header.group, header.seq));
      return;
    }
    clip = {
      id: hex(header.clipId), group: header.group, talker: header.talker, seq: header.seq,
      createdMs: header.createdMs, frameMs: header.frameMs, sampleRate: header.sampleRate, channels: header.channels,
      frames: [], waveform: null, live: !history, state: 'receiving', samples: 0, receipts: {}, own: header.talker === state.user,
      played: false,
    };
    addClip(header.group, clip);
    render();
    player = new ClipPlayer(header, { play: !history });
    for (;;) {
      const f = await reader.next();
      if (!f) throw new Error('the clip stream ended without its end');
      const m = decode(f.type, f.payload);
      if (m.name === 'ClipFrame') {
        if (m.index !== clip.frames.length) throw new Error('frames out of order');
        clip.frames.push(m.data);
        player.push(m.index, m.data);
      } else if (m.name === 'ClipEnd') {
        if (m.frameCount !== clip.frames.length) throw new Error('wrong frame count');
        clip.seq = m.seq;
        clip.waveform = m.waveform;
        clip.state = 'complete';
        addClip(clip.group, clip);
        render();
        if (!(header.flags & FLAG_FETCHED)) send(s, encode.deliveryAck(clip.group, clip.seq));
        clip.samples = await player.finish();
        if (clip.live) {
          state.liveSamples += clip.samples;
          clip.played = true;
          send(s, encode.played(clip.group, clip.seq));
        }
        render();
        return;
      } else {
        throw new Error(`unexpected ${m.name} on a clip stream`);
      }
    }
  } catch (e) {
    if (player) player.abort();
    if (clip) {
      const code = e.streamErrorCode;
      clip.state = 'cut';
      clip.reason = code != null ? `${errorName(code)}: ${errorWords(code)}` : (e.message || String(e));
      // A clip cut for being slow comes again from the store: drop the copy.
      const g = groupState(clip.group);
      if (code === 15 || code === 16 || code === 22) g.clips = g.clips.filter(c => c !== clip);
      render();
    }
    reader.cancel().catch(() => {});
  }
}

async function drain(reader) { while (await reader.next()); }

function onReceipt(m) {
  const clip = groupState(m.group).clips.find(c => c.id === hex(m.clipId));
  if (!clip) return;
  if (clip.receipts[m.user] !== 'played') clip.receipts[m.user] = m.kind;
}

/** Plays a clip again from its frames (and tells the talker it was played). */
async function playClip(clip) {
  await audioContext().resume();
  const player = new ClipPlayer({ sampleRate: clip.sampleRate, channels: clip.channels, frameMs: clip.frameMs }, { play: true });
  clip.frames.forEach((data, i) => player.push(i, data));
  await player.finish();
  if (!clip.played && clip.seq && session && !clip.own) {
    clip.played = true;
    send(session, encode.played(clip.group, clip.seq));
  }
}

// ---------------------------------------------------------------- talking

async function pressTalk() {
  const group = state.selected;
  if (!group || !session || state.talk.state !== 'idle') return;
  const s = session;
  const g = groupState(group);
  state.talk = { state: 'requesting', group, frames: 0, error: null, released: false };
  render();
  audioContext().resume().catch(() => {});
  try {
    if (g.mode === 'walkie') {
      const answer = await request(s, id => encode.floorRequest(id, group, false));
      if (answer.name === 'FloorDenied') throw new Error(`${answer.holder} is talking`);
      if (answer.name !== 'FloorGranted') throw new Error(errorWords(answer.code));
    }
    if (state.talk.released) {
      if (g.mode === 'walkie') send(s, encode.floorRelease(group));
      state.talk = { state: 'idle', group: null, frames: 0, error: null };
      return render();
    }
    recorder ||= new Recorder({ onPacket: () => {}, onError: e => tell(`recording failed: ${e.message || e}`) });
    const clipId = crypto.getRandomValues(new Uint8Array(16));
    const upload = { group, clipId, frames: [], header: null, end: null };
    const stream = await s.wt.createUnidirectionalStream();
    const writer = stream.getWriter();
    upload.writer = writer;
    await recorder.open();
    upload.header = {
      group, clipId, talker: '', seq: 0, format: FORMAT_OPUS, sampleRate: recorder.captureRate(), channels: 1, frameMs: 20,
      createdMs: Date.now(), flags: 0,
    };
    // The header is queued before the first packet can exist.
    writer.write(encode.clipHeader(upload.header)).catch(() => {});
    recorder.onPacket = data => {
      const index = upload.frames.length;
      upload.frames.push(data);
      state.talk.frames = upload.frames.length;
      writer.write(encode.clipFrame(index, data)).catch(() => {});
      if (index % 10 === 0) render();
    };
    await recorder.start();
    unanswered.set(hex(clipId), upload);
    addClip(group, { id: hex(clipId), group, talker: state.user, seq: 0, createdMs: upload.header.createdMs, frameMs: 20,
      sampleRate: 48000, channels: 1, frames: upload.frames, waveform: null, live: true, state: 'sending', samples: 0,
      receipts: {}, own: true, played: true });
    state.talk.state = 'talking';
    state.talk.upload = upload;
    render();
    if (state.talk.released) await releaseTalk();
  } catch (e) {
    state.talk = { state: 'idle', group: null, frames: 0, error: e.message || String(e) };
    tell(`${group}: cannot talk: ${e.message || e}`);
  }
}

async function releaseTalk() {
  if (state.talk.state === 'requesting') { state.talk.released = true; return; }
  if (state.talk.state !== 'talking') return;
  state.talk.state = 'sending';
  render();
  await stopTalk(false);
}

/** Ends the recording; `abandon` resets the upload instead of ending it. */
async function stopTalk(abandon) {
  const upload = state.talk.upload;
  if (recorder) await recorder.stop().catch(() => {});
  if (upload) {
    const clip = groupState(upload.group).clips.find(c => c.id === hex(upload.clipId));
    if (abandon) {
      upload.writer.abort(16).catch(() => {});
      unanswered.delete(hex(upload.clipId));
      if (clip) { clip.state = 'cut'; clip.reason = 'not sent'; }
    } else {
      const wave = recorder.waveform();
      upload.end = encode.clipEnd(upload.frames.length, 0, wave);
      if (clip) clip.waveform = wave;
      await upload.writer.write(upload.end).catch(() => {});
      await upload.writer.close().catch(() => {});
    }
  }
  state.talk = { state: 'idle', group: null, frames: 0, error: null };
  render();
}

/** Sends a recorded clip again on a new connection, same clip id. */
async function resend(s, upload) {
  if (!upload.end) return;
  try {
    const writer = (await s.wt.createUnidirectionalStream()).getWriter();
    await writer.write(encode.clipHeader(upload.header));
    for (let i = 0; i < upload.frames.length; i++) await writer.write(encode.clipFrame(i, upload.frames[i]));
    await writer.write(upload.end);
    await writer.close();
  } catch { /* the next connection tries again */ }
}

function onStored(m) {
  const id = hex(m.clipId);
  unanswered.delete(id);
  const clip = groupState(m.group).clips.find(c => c.id === id);
  if (clip) { clip.seq = m.seq; clip.state = 'complete'; addClip(m.group, clip); }
}

function onRejected(m) {
  const id = hex(m.clipId);
  unanswered.delete(id);
  for (const g of Object.values(state.groups)) {
    const clip = g.clips.find(c => c.id === id);
    if (clip) { clip.state = 'cut'; clip.reason = errorWords(m.code); }
  }
  tell(`your clip was not sent: ${errorWords(m.code)}${m.message ? ` (${m.message})` : ''}`);
  if (state.talk.upload && hex(state.talk.upload.clipId) === id) stopTalk(true);
}

// ---------------------------------------------------------------- the page

const $ = sel => document.querySelector(sel);
let renderQueued = false;

function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; draw(); });
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c != null) e.append(c);
  return e;
}

function fmtTime(ms) { return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' }); }
function fmtDuration(clip) { return `${(clip.frames.length * clip.frameMs / 1000).toFixed(1)} s`; }

function draw() {
  $('#signin').hidden = state.status !== 'signed-out';
  $('#main').hidden = state.status === 'signed-out';
  $('#status').textContent = state.status === 'connected' ? `${state.user} · connected` : state.status;
  $('#status').className = `status ${state.status}`;
  $('#messages').replaceChildren(...state.messages.slice(-4).map(m => el('li', { class: m.kind }, m.text)));
  const groups = Object.entries(state.groups).filter(([, g]) => !g.left);
  $('#groups').replaceChildren(...groups.map(([name, g]) => el('li', {
    class: name === state.selected ? 'selected' : '',
    onclick: () => { state.selected = name; render(); },
  }, el('span', { class: 'name' }, name), el('span', { class: 'mode' }, g.mode),
  g.floor ? el('span', { class: 'floor' }, `🎙 ${g.floor.user}`) : null)));
  const g = state.selected && state.groups[state.selected];
  $('#group-title').textContent = g ? `${state.selected} (${g.mode}${g.joined ? '' : ', not joined'}${g.caughtUp ? '' : ', catching up'})` : 'no group';
  $('#floor').textContent = g && g.mode === 'walkie'
    ? (g.floor ? `${g.floor.user} is talking${g.floor.emergency ? ' (emergency)' : ''}` : 'the floor is free')
    : '';
  const talk = $('#talk');
  talk.disabled = !g || state.status !== 'connected';
  talk.className = `talk ${state.talk.state}`;
  talk.textContent = state.talk.state === 'talking' ? `Talking… ${(state.talk.frames * 0.02).toFixed(1)} s`
    : state.talk.state === 'requesting' ? 'Asking for the floor…'
      : state.talk.state === 'sending' ? 'Sending…' : 'Hold to talk (space)';
  const list = $('#clips');
  list.replaceChildren(...(g ? g.clips.slice().reverse().map(clipRow) : []));
}

function clipRow(clip) {
  const canvas = el('canvas', { width: 240, height: 32, class: 'wave' });
  drawWaveform(canvas, clip.waveform, clip.own ? '#2f855a' : '#2b6cb0');
  const receipts = Object.entries(clip.receipts).map(([user, kind]) => el('span', { class: `receipt ${kind}` }, `${user} ${kind === 'played' ? '▶' : '✓'}`));
  return el('li', { class: `clip ${clip.state}${clip.own ? ' own' : ''}`, 'data-seq': clip.seq, 'data-id': clip.id },
    el('div', { class: 'meta' },
      el('b', {}, clip.own ? 'you' : clip.talker),
      el('span', {}, fmtTime(clip.createdMs)),
      el('span', {}, fmtDuration(clip)),
      el('span', { class: 'state' }, clip.state === 'receiving' ? 'live' : clip.state === 'cut' ? `cut: ${clip.reason}` : clip.state === 'sending' ? 'sending' : `#${clip.seq}`),
      clip.live ? null : el('span', { class: 'history' }, 'catch-up')),
    canvas,
    el('button', { class: 'play', onclick: () => playClip(clip), disabled: clip.state !== 'complete' }, '▶'),
    el('div', { class: 'receipts' }, receipts));
}

function signIn(e) {
  e.preventDefault();
  const value = $('#token').value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem('ptt-token', token);
  reconnectAttempt = 0;
  connect();
}

function signOut() {
  state.status = 'signed-out';
  sessionStorage.removeItem('ptt-token');
  clearTimeout(reconnectTimer);
  if (session) { const s = session; session = null; s.wt.close({ closeCode: 0, reason: 'signed out' }); }
  render();
}

function init() {
  $('#signin').addEventListener('submit', signIn);
  $('#signout').addEventListener('click', signOut);
  const talk = $('#talk');
  talk.addEventListener('pointerdown', e => {
    try { talk.setPointerCapture(e.pointerId); } catch { /* synthetic pointer */ }
    pressTalk();
  });
  talk.addEventListener('pointerup', releaseTalk);
  talk.addEventListener('pointercancel', releaseTalk);
  window.addEventListener('keydown', e => {
    if (e.code !== 'Space' || e.repeat || e.target.tagName === 'INPUT') return;
    e.preventDefault();
    pressTalk();
  });
  window.addEventListener('keyup', e => {
    if (e.code !== 'Space' || e.target.tagName === 'INPUT') return;
    e.preventDefault();
    releaseTalk();
  });
  if (!('WebTransport' in window) || !('AudioDecoder' in window)) {
    tell('this browser lacks WebTransport or WebCodecs: use a recent Chrome, Edge or Firefox');
  }
  const saved = sessionStorage.getItem('ptt-token');
  if (saved) { token = saved; connect(); }
  render();
}

window.ptt = { state, T };
init();
