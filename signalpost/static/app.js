// The signalpost demo: a two-person video call with chat, built on the browser SDK.
//
// Flow: camera and microphone -> dev token (/v1/dev-token) -> connect -> join the room.
// The first person in a room waits; the second finds them in `joined.members`. Both sides
// then open a PeerLink (perfect negotiation over `signal` frames) and a negotiated
// RTCDataChannel for chat. A third person gets `room_full`.

import { PeerLink, SignalpostClient } from "./signalpost.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Edge URLs: this page's origin, or a comma separated `?signal=` list (a cluster's edges).
const SIGNAL_URLS = params.get("signal")
  ? params.get("signal").split(",").map((u) => u.trim()).filter(Boolean)
  : [`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/signal`];
const REJOIN_FOR_MS = 45000; // a replaced session can hold our seat until its resume window ends

const ui = {
  lobby: $("lobby"), call: $("call"), callMeta: $("call-meta"),
  form: $("join-form"), name: $("name"), room: $("room"), join: $("join"),
  joinError: $("join-error"), lobbyNote: $("lobby-note"),
  status: $("status"), statusText: $("status-text"), roomLabel: $("room-label"), copyLink: $("copy-link"),
  remoteVideo: $("remote-video"), localVideo: $("local-video"), unmute: $("unmute-remote"),
  waiting: $("waiting"), waitingAvatar: $("waiting-avatar"), waitingTitle: $("waiting-title"), waitingText: $("waiting-text"),
  peerTag: $("peer-tag"), peerName: $("peer-name"), peerPresence: $("peer-presence"),
  signalState: $("signal-state"), iceState: $("ice-state"), peerStatus: $("peer-status"),
  chatLog: $("chat-log"), chatForm: $("chat-form"), chatInput: $("chat-input"), chatSend: $("chat-send"), chatHint: $("chat-hint"),
  mic: $("toggle-mic"), cam: $("toggle-cam"), hangup: $("hangup"),
};

/** Everything about the current call; null fields when not in one. */
const call = {
  client: null,
  room: null,
  name: null,
  user: null,
  stream: null, // local media
  peer: null, // the other member ({session, user, meta})
  link: null, // PeerLink to the peer
  channel: null, // chat RTCDataChannel
  presence: "unknown",
  offs: [],
};

// Tests and curious developers can look at the live objects; nothing is printed.
window.signalpostDemo = call;

// ------------------------------------------------------------------ lobby

function slug(text) {
  return text.toLowerCase().normalize("NFKD").replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "guest";
}

function randomRoom() {
  const words = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper", "kelp", "lumen"];
  const pick = () => words[Math.floor(Math.random() * words.length)];
  return `${pick()}-${pick()}-${Math.floor(100 + Math.random() * 900)}`;
}

function initLobby() {
  ui.name.value = params.get("name") || localStorage.getItem("signalpost.name") || "";
  ui.room.value = params.get("room") || randomRoom();
  (ui.name.value ? ui.join : ui.name).focus();
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    joinCall().catch((err) => showLobbyError(describe(err)));
  });
}

function showLobbyError(message) {
  ui.joinError.textContent = message;
  ui.joinError.hidden = !message;
}

function showLobbyNote(message) {
  ui.lobbyNote.textContent = message;
  ui.lobbyNote.hidden = !message;
}

function describe(err) {
  switch (err && err.code) {
    case "room_full":
      return `Room “${call.room || ui.room.value}” is full: two people are already in this call.`;
    case "forbidden":
      return "Your token does not allow this room.";
    case "unauthorized":
      return "The signaling server refused the sign-in.";
    case "connect_failed":
    case "timeout":
      return "Could not reach the signaling server. Check your connection and try again.";
    default:
      return (err && err.message) || "Something went wrong.";
  }
}

let cachedToken = null; // {user, token, exp}

/** Seconds since the epoch when a JWT expires (0 if unreadable). */
function expiryOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).exp || 0;
  } catch {
    return 0;
  }
}

/**
 * A token for `user`: `?token=` when given (any edge of a cluster), else one from this
 * server's /v1/dev-token (dev mode), reused until close to expiry so that a resume does
 * not depend on the server that served the page.
 */
async function demoToken(user) {
  if (params.get("token")) return params.get("token");
  const now = Date.now() / 1000;
  if (cachedToken && cachedToken.user === user && cachedToken.exp - 120 > now) return cachedToken.token;
  try {
    const response = await fetch(`/v1/dev-token?user=${encodeURIComponent(user)}`, { cache: "no-store" });
    if (!response.ok) throw new Error("This server does not hand out demo tokens (dev mode only).");
    const { token } = await response.json();
    cachedToken = { user, token, exp: expiryOf(token) };
    return token;
  } catch (err) {
    if (cachedToken && cachedToken.user === user && cachedToken.exp > now) return cachedToken.token;
    throw err;
  }
}

async function localMedia() {
  const video = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
  for (const constraints of [{ video, audio: true }, { video, audio: false }, { video: false, audio: true }]) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch {
      /* try with less */
    }
  }
  return new MediaStream(); // receive only
}

async function joinCall() {
  const name = ui.name.value.trim();
  const room = ui.room.value.trim();
  showLobbyError("");
  showLobbyNote("");
  if (!name) return showLobbyError("Enter your name.");
  if (!/^[\w.-]{1,64}$/.test(room)) return showLobbyError("Room names use letters, digits, “-”, “_” and “.”.");
  localStorage.setItem("signalpost.name", name);
  ui.join.disabled = true;
  ui.join.textContent = "Joining…";
  Object.assign(call, { room, name, user: `${slug(name)}-${Math.random().toString(36).slice(2, 6)}` });
  try {
    call.stream = await localMedia();
    const client = new SignalpostClient({ url: SIGNAL_URLS, getToken: () => demoToken(call.user) });
    call.client = client;
    listen(client);
    await client.connect();
    const joined = await client.join(room, { name });
    enterCall();
    adoptMembers(joined.members);
  } catch (err) {
    teardown();
    throw err;
  } finally {
    ui.join.disabled = false;
    ui.join.textContent = "Join call";
  }
}

// ------------------------------------------------------------------ signaling

function listen(client) {
  const on = (type, fn) => call.offs.push(client.on(type, fn));
  on("state", ({ state }) => renderSignaling(state));
  on("peer-joined", ({ room, peer }) => {
    if (room === call.room && !call.peer) startLink(peer, true);
  });
  on("peer-left", ({ room, peer, reason }) => {
    if (room !== call.room || !call.peer || peer.session !== call.peer.session) return;
    const who = displayName(peer);
    systemMessage(reason === "timeout" ? `${who} lost their connection` : `${who} left the call`);
    endLink();
    // Someone else may be in the room already (a peer that came back as a new session).
    const next = client.members(room)[0];
    if (next) startLink(next, true);
  });
  on("presence", ({ user, status }) => {
    if (call.peer && user === call.peer.user) renderPresence(status);
  });
  on("resumed", ({ resumed }) => {
    if (!resumed) rejoin(); // a new session: the old one's rooms and links are gone
  });
  on("room-lost", ({ room }) => {
    if (room === call.room) rejoin();
  });
  on("closed", ({ code }) => {
    if (call.client === client && code !== 1000) {
      leaveCall("The connection to the signaling server was lost.");
    }
  });
}

function adoptMembers(members) {
  const peer = members[0];
  if (peer) startLink(peer, false);
  render();
}

async function rejoin() {
  const { client, room, name } = call;
  endLink();
  renderStatus("reconnecting", "Rejoining the room…");
  const deadline = Date.now() + REJOIN_FOR_MS;
  while (call.client === client && Date.now() < deadline) {
    try {
      const joined = await client.join(room, { name });
      if (call.client === client) adoptMembers(joined.members);
      return;
    } catch (err) {
      if (err.code === "session_lost") return; // a new session: its `resumed` event rejoins
      if (err.code !== "room_full" && err.code !== "timeout" && err.code !== "connection_lost") {
        leaveCall(describe(err));
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
  if (call.client === client) leaveCall("Could not get back into the room.");
}

// ------------------------------------------------------------------ the peer connection

function displayName(peer) {
  return (peer && peer.meta && peer.meta.name) || (peer && peer.user) || "Guest";
}

function startLink(peer, initiator) {
  const { client, room, stream } = call;
  // The one already in the room offers; the newcomer waits for that offer (no glare).
  const link = new PeerLink(client, { room, peer, iceServers: client.welcome.ice_servers || [], waitForOffer: !initiator });
  call.peer = peer;
  call.link = link;
  call.initiator = initiator;
  for (const track of stream.getTracks()) link.pc.addTrack(track, stream);
  // Negotiated on both sides: no glare over who creates it.
  const channel = link.pc.createDataChannel("chat", { negotiated: true, id: 0 });
  call.channel = channel;
  channel.onopen = () => renderChat();
  channel.onclose = () => renderChat();
  channel.onmessage = (event) => receiveChat(event.data);
  link.on("track", ({ track, streams }) => {
    const remote = streams[0] || ui.remoteVideo.srcObject || new MediaStream();
    if (!streams[0]) remote.addTrack(track);
    if (ui.remoteVideo.srcObject !== remote) ui.remoteVideo.srcObject = remote;
    playRemote();
  });
  link.on("state", () => render());
  link.on("restart", () => { call.route = null; });
  link.on("error", () => {}); // stale candidates after an ICE restart and the like: recovered by the link
  systemMessage(initiator ? `${displayName(peer)} joined` : `You joined ${displayName(peer)}`);
  client.watch([peer.user]).then(
    (presence) => call.peer === peer && renderPresence(presence[peer.user]),
    () => {},
  );
  render();
}

function endLink() {
  const { link, peer, client } = call;
  if (link) link.close();
  if (peer && client && client.state === "open") client.unwatch([peer.user]).catch(() => {});
  Object.assign(call, { link: null, peer: null, channel: null, presence: "unknown", route: null });
  ui.remoteVideo.srcObject = null;
  ui.unmute.hidden = true;
  render();
}

/** "direct" or "relayed (TURN)", from the selected ICE candidate pair. */
async function describeRoute(link) {
  call.route = "…";
  try {
    const stats = await link.pc.getStats();
    let pair = null;
    stats.forEach((report) => {
      if (report.type === "transport" && report.selectedCandidatePairId) pair = stats.get(report.selectedCandidatePairId);
    });
    if (!pair) stats.forEach((report) => { if (report.type === "candidate-pair" && report.nominated && report.state === "succeeded") pair = report; });
    const local = pair && stats.get(pair.localCandidateId);
    const remote = pair && stats.get(pair.remoteCandidateId);
    const relayed = [local, remote].some((c) => c && c.candidateType === "relay");
    if (call.link === link) call.route = relayed ? "relayed (TURN)" : "direct";
  } catch {
    if (call.link === link) call.route = null;
  }
  render();
}

function playRemote() {
  const video = ui.remoteVideo;
  video.play().catch(() => {
    // Autoplay with sound refused: play muted and offer a click to unmute.
    video.muted = true;
    video.play().catch(() => {});
    ui.unmute.hidden = false;
  });
}

// ------------------------------------------------------------------ chat

function sendChat(text) {
  const { channel } = call;
  if (!channel || channel.readyState !== "open") return false;
  channel.send(JSON.stringify({ type: "chat", text, at: Date.now() }));
  appendChat({ mine: true, author: "You", text, at: Date.now() });
  return true;
}

function receiveChat(raw) {
  let message;
  try {
    message = JSON.parse(raw);
  } catch {
    return;
  }
  if (message.type !== "chat" || typeof message.text !== "string") return;
  appendChat({ mine: false, author: displayName(call.peer), text: message.text.slice(0, 2000), at: Date.now() });
}

function appendChat({ mine, author, text, at }) {
  const item = document.createElement("li");
  item.className = `msg ${mine ? "mine" : "theirs"}`;
  const meta = document.createElement("div");
  meta.className = "msg-meta";
  meta.textContent = `${author} · ${new Date(at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  item.append(meta, bubble);
  ui.chatLog.append(item);
  ui.chatLog.scrollTop = ui.chatLog.scrollHeight;
}

function systemMessage(text) {
  const item = document.createElement("li");
  item.className = "msg system";
  item.textContent = text;
  ui.chatLog.append(item);
  ui.chatLog.scrollTop = ui.chatLog.scrollHeight;
}

// ------------------------------------------------------------------ rendering

function initials(name) {
  return name.split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join("") || "?";
}

function renderStatus(state, text) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
}

function renderSignaling(state) {
  const labels = { connecting: "Connecting…", open: "Connected", reconnecting: "Reconnecting…", closed: "Disconnected", idle: "—" };
  ui.signalState.textContent = labels[state] || state;
  ui.signalState.dataset.state = state;
  render();
}

function renderPresence(status) {
  call.presence = status || "unknown";
  render();
}

function renderChat() {
  const open = Boolean(call.channel && call.channel.readyState === "open");
  ui.chatInput.disabled = !open;
  ui.chatSend.disabled = !open;
  ui.chatInput.placeholder = open ? `Message ${displayName(call.peer)}` : "Message";
  ui.chatHint.textContent = open ? "Peer to peer" : "Opens when you are connected";
}

function render() {
  const { client, link, peer } = call;
  if (!client || ui.call.hidden) return;
  const signaling = client.state;
  const media = link ? link.pc.connectionState : "new";
  const name = displayName(peer);

  // Media flows peer to peer: a call stays up while signaling reconnects.
  if (peer && media === "connected") renderStatus("connected", `In call with ${name}`);
  else if (signaling === "reconnecting") renderStatus("reconnecting", "Reconnecting to signaling…");
  else if (!peer) renderStatus("waiting", "Waiting for someone to join");
  else if (media === "failed" || media === "disconnected") renderStatus("reconnecting", `Reconnecting to ${name}…`);
  else renderStatus("connecting", `Connecting to ${name}…`);

  const mediaLabels = { new: "Starting…", connecting: "Connecting…", connected: "Connected", disconnected: "Interrupted", failed: "Failed", closed: "Closed" };
  let mediaText = link ? mediaLabels[media] || media : "Not started";
  if (media === "connected" && call.route && call.route !== "…") mediaText = `Connected · ${call.route}`;
  ui.iceState.textContent = mediaText;
  ui.iceState.title = link ? `ICE ${link.pc.iceConnectionState}` : "";
  ui.iceState.dataset.state = link ? media : "none";
  if (media === "connected" && !call.route && link) describeRoute(link);

  ui.peerTag.hidden = !peer;
  ui.peerName.textContent = name;
  ui.peerPresence.dataset.status = call.presence;
  ui.peerPresence.title = call.presence;
  ui.peerStatus.textContent = peer ? `${name} · ${call.presence === "unknown" ? "checking…" : call.presence}` : "Nobody yet";
  ui.peerStatus.dataset.state = peer ? call.presence : "none";

  const live = Boolean(peer && media === "connected");
  ui.waiting.hidden = live;
  ui.remoteVideo.classList.toggle("live", live);
  if (!peer) {
    ui.waitingAvatar.textContent = initials(call.name || "");
    ui.waitingTitle.textContent = "Waiting for someone to join";
    ui.waitingText.textContent = "Share the invite link. The first two people in a room are connected.";
  } else {
    ui.waitingAvatar.textContent = initials(name);
    ui.waitingTitle.textContent = media === "failed" || media === "disconnected" ? `Reconnecting to ${name}` : `Connecting to ${name}`;
    ui.waitingText.textContent = "Setting up a direct connection…";
  }
  renderChat();
}

function enterCall() {
  ui.lobby.hidden = true;
  ui.call.hidden = false;
  ui.callMeta.hidden = false;
  ui.status.hidden = false;
  ui.roomLabel.textContent = call.room;
  ui.localVideo.srcObject = call.stream;
  ui.localVideo.closest(".local-tile").dataset.video = call.stream.getVideoTracks().length ? "on" : "off";
  ui.chatLog.replaceChildren();
  const url = new URL(location.href);
  url.searchParams.set("room", call.room);
  history.replaceState(null, "", url);
  renderSignaling(call.client.state);
  document.title = `${call.room} · signalpost`;
}

function teardown() {
  endLink();
  for (const off of call.offs) off();
  call.offs = [];
  if (call.client) call.client.close();
  if (call.stream) for (const track of call.stream.getTracks()) track.stop();
  Object.assign(call, { client: null, stream: null });
  ui.status.hidden = true;
  ui.localVideo.srcObject = null;
}

function leaveCall(note) {
  const { client, room } = call;
  if (client && client.state === "open") client.leave(room).catch(() => {}).finally(() => client.close());
  if (client) call.offs.forEach((off) => off());
  call.offs = [];
  call.client = null; // closed below, after the leave went out
  endLink();
  if (call.stream) for (const track of call.stream.getTracks()) track.stop();
  call.stream = null;
  if (client && client.state !== "open") client.close();
  ui.call.hidden = true;
  ui.callMeta.hidden = true;
  ui.status.hidden = true;
  ui.lobby.hidden = false;
  renderStatus("idle", "Ready");
  document.title = "signalpost · video call";
  showLobbyNote(note || "");
  ui.join.focus();
}

// ------------------------------------------------------------------ controls

function toggleTracks(kind, button) {
  const tracks = call.stream ? call.stream.getTracks().filter((t) => t.kind === kind) : [];
  if (!tracks.length) return;
  const enabled = !tracks[0].enabled;
  for (const track of tracks) track.enabled = enabled;
  button.setAttribute("aria-pressed", String(!enabled));
  if (kind === "audio") button.title = enabled ? "Mute microphone" : "Unmute microphone";
  else {
    button.title = enabled ? "Turn camera off" : "Turn camera on";
    ui.localVideo.closest(".local-tile").dataset.video = enabled ? "on" : "off";
  }
}

function initControls() {
  ui.mic.addEventListener("click", () => toggleTracks("audio", ui.mic));
  ui.cam.addEventListener("click", () => toggleTracks("video", ui.cam));
  ui.hangup.addEventListener("click", () => leaveCall("You left the call."));
  ui.unmute.addEventListener("click", () => {
    ui.remoteVideo.muted = false;
    ui.remoteVideo.play().catch(() => {});
    ui.unmute.hidden = true;
  });
  ui.chatForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.chatInput.value.trim();
    if (text && sendChat(text)) ui.chatInput.value = "";
    ui.chatInput.focus();
  });
  ui.copyLink.addEventListener("click", async () => {
    const url = new URL(location.href);
    url.search = "";
    url.searchParams.set("room", call.room);
    const label = ui.copyLink.querySelector("span");
    try {
      await navigator.clipboard.writeText(url.href);
      label.textContent = "Link copied";
    } catch {
      label.textContent = url.href;
    }
    setTimeout(() => (label.textContent = "Copy invite link"), 2500);
  });
  // Leaving the page ends the session at once, so the peer is told right away.
  addEventListener("pagehide", () => call.client && call.client.close("page closed"));
}

initLobby();
initControls();

// ------------------------------------------------------------------ webhooks panel

// In dev mode the server hands its webhooks to a receiver of its own and serves what it
// received at /v1/dev-webhooks (docs/webhooks.md), making them only while this panel polls
// (from its first poll on); elsewhere that is a 404 and the panel stays hidden.
const hooksPanel = $("hooks-panel");
const hooksLog = $("hooks-log");
let hooksAfter = 0;

function hookLine(event) {
  const li = document.createElement("li");
  const type = document.createElement("span");
  type.className = "hook-type";
  type.textContent = event.type;
  const what = document.createElement("span");
  what.className = "hook-what";
  const parts = [];
  if (event.room) parts.push(`room ${event.room}`);
  if (event.user) parts.push(`user ${event.user}`);
  if (event.peer && event.peer.user) parts.push(`peer ${event.peer.user}`);
  if (event.reason) parts.push(event.reason);
  what.textContent = parts.join(" · ");
  what.title = event.id;
  li.append(type, what);
  return li;
}

async function pollHooks() {
  try {
    const response = await fetch(`/v1/dev-webhooks?after=${hooksAfter}`, { cache: "no-store" });
    if (response.status === 404) return; // not dev mode: no panel
    if (response.ok) {
      const { events } = await response.json();
      hooksPanel.hidden = false;
      for (const { n, event } of events) {
        hooksAfter = Math.max(hooksAfter, n);
        hooksLog.append(hookLine(event));
        while (hooksLog.children.length > 100) hooksLog.firstElementChild.remove();
        hooksLog.scrollTop = hooksLog.scrollHeight;
      }
    }
  } catch {
    // the server is restarting: try again
  }
  setTimeout(pollHooks, 1000);
}

pollHooks();
