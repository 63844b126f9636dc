// The classic Socket.IO WebRTC signaling server: the baseline signalpost is compared with.
//
// What the tutorials and most small apps run: one Node process, socket.io rooms, a JWT
// (HS256) checked once at connect, `join` with a capacity check, `signal` relayed to one
// member (`to`) or the rest of the room, `leave`, and `peer-left` on disconnect. Every
// request is acknowledged (socket.io acks), like signalpost's `id`/`ack`.
//
//   PORT=9100 JWT_SECRET=... ROOM_CAPACITY=2 node server.js
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

io.on("connection", (socket) => {
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
});

httpServer.listen(port, host, () => {
  console.log(`socket.io signaling: ws://${host}:${httpServer.address().port}/socket.io/`);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    io.close();
    process.exit(0);
  });
}
