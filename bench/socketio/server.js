// The classic Socket.IO WebRTC signaling server: the baseline signalpost is compared with.
//
// What the tutorials and most small apps run: one Node process, socket.io rooms, a JWT
// (HS256) checked once at connect, `join` with a capacity check, `signal` relayed to one
// member (`to`) or the rest of the room, `leave`, and `peer-left` on disconnect. Every
// request is acknowledged (socket.io acks), like signalpost's `id`/`ack`.
//
//   PORT=9100 JWT_SECRET=... ROOM_CAPACITY=2 node server.js
//
// Scaled out, the way the Socket.IO docs scale it: with REDIS_URL set, the same server runs
// as one of several processes sharing rooms through @socket.io/redis-adapter (see
// "Scaled out" below); without it, it is the single process above, unchanged.
//
//   REDIS_URL=redis://127.0.0.1:6379 PORT=9101 JWT_SECRET=... node server.js
//
// Prints "socket.io signaling: ws://127.0.0.1:<port>/socket.io/" once listening.
"use strict";

const crypto = require("node:crypto");
const http = require("node:http");
const { Server } = require("socket.io");

const host = process.env.HOST || "127.0.0.1";
const port = Number(process.env.PORT || 0);
const secret = process.env.JWT_SECRET || "";
const capacity = Number(process.env.ROOM_CAPACITY || 2);
const redisUrl = process.env.REDIS_URL || "";

function b64url(buf) {
  return buf.toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

// HS256 only: enough for the benchmark, checked the way a small app would check it.
function verify(token) {
  const parts = String(token || "").split(".");
  if (parts.length !== 3) return null;
  const mac = b64url(crypto.createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest());
  if (mac.length !== parts[2].length ||
      !crypto.timingSafeEqual(Buffer.from(mac), Buffer.from(parts[2]))) return null;
  const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
  if (typeof claims.exp === "number" && claims.exp < Date.now() / 1000) return null;
  return claims;
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  maxHttpBufferSize: 65536,
  pingInterval: 25000,
  pingTimeout: 20000,
});

io.use((socket, next) => {
  const claims = verify(socket.handshake.auth && socket.handshake.auth.token);
  if (!claims || !claims.sub) return next(new Error("unauthorized"));
  socket.data.user = claims.sub;
  next();
});

function singleProcess(socket) {
  const me = () => ({ session: socket.id, user: socket.data.user });

  socket.on("join", (msg, ack) => {
    const room = msg && msg.room;
    if (typeof room !== "string" || !room) return ack && ack({ error: "bad_request" });
    const members = io.sockets.adapter.rooms.get(room);
    if (!socket.rooms.has(room)) {
      if (members && members.size >= capacity) return ack && ack({ error: "room_full" });
      socket.to(room).emit("peer-joined", { room, peer: me() });
      socket.join(room);
    }
    const others = [];
    for (const id of io.sockets.adapter.rooms.get(room) || []) {
      if (id !== socket.id) {
        const peer = io.sockets.sockets.get(id);
        others.push({ session: id, user: peer ? peer.data.user : "" });
      }
    }
    if (ack) ack({ room, members: others });
  });

  socket.on("signal", (msg, ack) => {
    const room = msg && msg.room;
    if (!socket.rooms.has(room)) return ack && ack({ error: "not_in_room" });
    const out = { room, from: me(), data: msg.data };
    if (msg.to) {
      const members = io.sockets.adapter.rooms.get(room);
      if (!members || !members.has(msg.to) || msg.to === socket.id) {
        return ack && ack({ error: "unknown_peer" });
      }
      io.to(msg.to).emit("signal", out);
    } else {
      socket.to(room).emit("signal", out);
    }
    if (ack) ack({});
  });

  socket.on("leave", (msg, ack) => {
    const room = msg && msg.room;
    if (!socket.rooms.has(room)) return ack && ack({ error: "not_in_room" });
    socket.leave(room);
    socket.to(room).emit("peer-left", { room, peer: me(), reason: "left" });
    if (ack) ack({ room });
  });

  socket.on("disconnecting", () => {
    for (const room of socket.rooms) {
      if (room !== socket.id) {
        socket.to(room).emit("peer-left", { room, peer: me(), reason: "disconnected" });
      }
    }
  });
}

// ----------------------------------------------------------------------------- scaled out
//
// The adapter carries every emit to the other processes (a PUBLISH per emit, which each
// process receives and delivers to its own sockets), but `io.sockets.adapter.rooms` still
// lists only this process's sockets: with a call's two peers on different processes,
// neither would see the other in the room. So the membership the checks need (capacity,
// the `members` of a join, "is `to` in this room") lives in Redis as well: one hash per
// room, session id -> user. That is one command per join, leave and signal `to` a peer:
// cheaper than asking every process with `io.in(room).fetchSockets()` (a request PUBLISHed
// to all of them and their answers awaited) on every signal.
//
// Each command is sent when the request arrives, so a client's requests pipeline on the
// Redis connection; their continuations run in arrival order through a per-socket chain,
// so a client's requests still take effect in the order it sent them (Redis answers in
// order, but a request that needs no command must wait for the ones before it).
// A join adds first and checks the size after: two joins racing for the last place may
// both be refused, never both admitted. A process that dies leaves its members in the
// hashes (a real deployment would expire them); the benchmark starts a fresh Redis.

let store = null; // the adapter's publishing connection; commands pipeline with its PUBLISHes

const roomKey = (room) => `room:${room}`;

function scaledOut(socket) {
  const me = () => ({ session: socket.id, user: socket.data.user });
  let tail = Promise.resolve();

  // Run `then(result)` after every earlier request of this socket, once `pending` settles.
  const inOrder = (ack, pending, then) => {
    tail = tail
      .then(() => pending)
      .then(then)
      .catch((err) => {
        console.error(`request failed: ${err && err.message}`);
        if (ack) ack({ error: "internal" });
      });
  };

  socket.on("join", (msg, ack) => {
    const room = msg && msg.room;
    if (typeof room !== "string" || !room) return ack && ack({ error: "bad_request" });
    const key = roomKey(room);
    const pending = store.multi().hSet(key, socket.id, socket.data.user).hLen(key).hGetAll(key).exec();
    inOrder(ack, pending, async ([added, size, all]) => {
      if (added && size > capacity) {
        await store.hDel(key, socket.id);
        return ack && ack({ error: "room_full" });
      }
      if (added) socket.to(room).emit("peer-joined", { room, peer: me() });
      socket.join(room);
      const others = [];
      for (const [session, user] of Object.entries(all)) {
        if (session !== socket.id) others.push({ session, user });
      }
      if (ack) ack({ room, members: others });
    });
  });

  socket.on("signal", (msg, ack) => {
    const room = msg && msg.room;
    const to = msg && msg.to;
    const pending = to ? store.hExists(roomKey(room), to) : null;
    inOrder(ack, pending, (isMember) => {
      if (!socket.rooms.has(room)) return ack && ack({ error: "not_in_room" });
      const out = { room, from: me(), data: msg.data };
      if (to) {
        if (!isMember || to === socket.id) return ack && ack({ error: "unknown_peer" });
        io.to(to).emit("signal", out);
      } else {
        socket.to(room).emit("signal", out);
      }
      if (ack) ack({});
    });
  });

  socket.on("leave", (msg, ack) => {
    const room = msg && msg.room;
    // Removing a session that is not a member is a no-op, so the command need not wait.
    const pending = typeof room === "string" ? store.hDel(roomKey(room), socket.id) : null;
    inOrder(ack, pending, () => {
      if (!socket.rooms.has(room)) return ack && ack({ error: "not_in_room" });
      socket.leave(room);
      socket.to(room).emit("peer-left", { room, peer: me(), reason: "left" });
      if (ack) ack({ room });
    });
  });

  socket.on("disconnecting", () => {
    const rooms = [...socket.rooms].filter((room) => room !== socket.id);
    const pending = Promise.all(rooms.map((room) => store.hDel(roomKey(room), socket.id)));
    inOrder(null, pending, () => {
      for (const room of rooms) {
        socket.to(room).emit("peer-left", { room, peer: me(), reason: "disconnected" });
      }
    });
  });
}

async function main() {
  if (redisUrl) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pubClient = createClient({ url: redisUrl });
    const subClient = pubClient.duplicate();
    for (const client of [pubClient, subClient]) {
      client.on("error", (err) => console.error(`redis: ${err.message}`));
    }
    await Promise.all([pubClient.connect(), subClient.connect()]);
    io.adapter(createAdapter(pubClient, subClient));
    store = pubClient;
    io.on("connection", scaledOut);
  } else {
    io.on("connection", singleProcess);
  }
  httpServer.listen(port, host, () => {
    console.log(`socket.io signaling: ws://${host}:${httpServer.address().port}/socket.io/`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    io.close();
    process.exit(0);
  });
}
