/**
 * signalpost browser SDK: a plain ES module, no build step, no dependencies.
 *
 *     import { SignalpostClient, PeerLink } from "/static/signalpost.js";
 *     const client = new SignalpostClient({ url: "wss://example.org/v1/signal", getToken });
 *     await client.connect();
 *     const joined = await client.join("room-1", { name: "Alice" });
 *     client.on("signal", ({ room, from, data }) => { ... });
 *
 * Theory of operation. One WebSocket carries one session (docs/protocol.md). Requests
 * get an id and a promise that settles with the reply of the same id, or rejects with a
 * `SignalpostError` whose `.code` is the server's error code (or a client-side code:
 * `timeout`, `session_lost`, `connection_lost`, `not_connected`, `closed`). Everything
 * without an id is an event (`peer-joined`, `peer-left`, `signal`, `presence`,
 * `recovered`).
 *
 * An id names one request of the session ("Retrying a request" in docs/protocol.md): the
 * counter never restarts, so the cluster applies a request at most once however often
 * it is sent, and answers a resend with the reply it recorded. A dropped connection
 * therefore fails no request: each waits for its reply, under its one timeout. After the
 * reconnect, `resumed: true` resends every request still waiting, with its id, in the
 * order they were made (after the welcome and the re-watch), then sends the requests
 * made while reconnecting; `resumed: false` rejects the ones already sent with
 * `session_lost` (the old session is gone with whatever it applied). Each promise
 * settles once: a reply to an id no longer waiting (timed out, or a copy) is ignored.
 *
 * For every joined room the client keeps the `epoch` and the last `offset` it saw. When
 * the connection drops without a clean close, it reconnects (to the next URL when given
 * several, after a delay from `backoffDelays`) and resumes: `hello` carries the resume
 * token and those positions, the cluster replays what was missed and reports
 * `recovered` per room. A room that could not be recovered is joined again (a no-op on
 * the server that returns the current epoch, offset and members), so missed arrivals
 * and departures surface as `peer-joined`/`peer-left` events marked `synthetic`, and
 * `PeerLink` restarts ICE. A `resumed` event with `resumed: false` means a new session:
 * the rooms are gone and the app has to join again.
 *
 * `PeerLink` wraps one RTCPeerConnection to one remote session of a room and speaks
 * "perfect negotiation" over `signal` frames: `{kind: "offer"|"answer", sdp}` and
 * `{kind: "candidate", candidate}`.
 */

/** WebSocket close codes of the protocol. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // edge draining: reconnect elsewhere and resume
  ABNORMAL: 1006,
  UNSUPPORTED_DATA: 1003,
  TOO_LARGE: 1009,
  ABUSE: 4400,
  UNAUTHORIZED: 4401,
  ORIGIN_REFUSED: 4403,
  HELLO_TIMEOUT: 4408,
  REPLACED: 4409, // the session resumed on another connection
  KICKED: 4410, // the server API ended the session: its resume is refused
  RATE_LIMITED: 4429,
  TRY_AGAIN_LATER: 4503, // the edge is busy (a cap, a reconnect storm): retry after the reason's delay
});

/** Close codes after which reconnecting cannot help: the client goes to `closed`. */
export const FINAL_CLOSE_CODES = new Set([
  CloseCode.ABUSE,
  CloseCode.UNAUTHORIZED,
  CloseCode.ORIGIN_REFUSED,
  CloseCode.REPLACED,
  CloseCode.RATE_LIMITED, // the server ends a session closed for abuse: nothing to resume
  CloseCode.KICKED,
]);

/** Connection states, in the order a healthy client goes through them. */
export const State = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** Room and epoch pairs whose highest offset seen is kept past a leave. */
const MAX_SEEN_POSITIONS = 256;

const REPLY_TYPES = new Set([
  "welcome", "joined", "left", "ack", "watching", "unwatched", "pong", "ice-servers", "error",
]);

/** An error reply from the server, or a client-side failure of a request. */
export class SignalpostError extends Error {
  /**
   * @param {string} code protocol error code (`room_full`, `not_in_room`, ...) or a
   *   client code (`timeout`, `session_lost`, `connection_lost`, `not_connected`, `closed`,
   *   `connect_failed`)
   * @param {string} message
   * @param {{closeCode?: number, closeReason?: string, frame?: object}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message ? `${code}: ${message}` : code);
    this.name = "SignalpostError";
    this.code = code;
    this.closeCode = extra.closeCode;
    this.closeReason = extra.closeReason;
    this.frame = extra.frame;
  }
}

/**
 * Reconnect delays in milliseconds: exponential growth capped at `maximum`, with full
 * jitter (each delay uniform in [0, cap)), so that clients dropped together by a dead
 * edge do not come back together. A pure generator: pass `random` to make it
 * deterministic.
 */
export function* backoffDelays({ initial = 250, maximum = 10000, factor = 2, random = Math.random } = {}) {
  for (let attempt = 0; ; attempt++) {
    yield random() * Math.min(maximum, initial * factor ** attempt);
  }
}

/**
 * The delay a 4503 close asks for, in ms: its reason is `retry_after_ms=<int> <kind>`
 * (docs/protocol.md, "Close codes"); a reason without it means 1000 ms.
 */
export function retryAfterMs(reason) {
  const match = /^retry_after_ms=(\d+)/.exec(reason || "");
  return match ? Number(match[1]) : 1000;
}

/**
 * How long to wait after a 4503: the delay asked for plus a random part of up to as much
 * again, so that clients refused together do not come back together.
 */
export function retryDelay(retryAfter, random = Math.random) {
  return retryAfter + random() * retryAfter;
}

/**
 * Per-region edge URLs, `[[region, [url...]], ...]`, from a `url` option: a string or a
 * list is one region named ""; an object `{eu: [...], us: [...]}` lists regions in the
 * order to fall back in. Throws a TypeError when a region has no URLs.
 */
export function regionsOf(url) {
  let regions;
  if (typeof url === "string") regions = [["", [url]]];
  else if (typeof URL !== "undefined" && url instanceof URL) regions = [["", [url.href]]];
  else if (Array.isArray(url)) regions = [["", [...url]]];
  else if (url && typeof url === "object") {
    regions = Object.entries(url).map(([name, urls]) => [name, Array.isArray(urls) ? [...urls] : urls]);
  } else regions = [];
  if (!regions.length) throw new TypeError("SignalpostClient needs a url");
  for (const [name, urls] of regions) {
    if (!Array.isArray(urls) || !urls.length || !urls.every((u) => typeof u === "string" && u)) {
      throw new TypeError(`region ${JSON.stringify(name)} needs a list of edge URLs`);
    }
  }
  return regions;
}

/**
 * Which edge to try next (pure): the current region's URLs in turn; when every URL of the
 * region failed in a row (the one that dropped counts), the next region's first, wrapping
 * around. A welcome resets the count: the client stays in the region it reached.
 */
export class EdgePlan {
  #index = 0;
  #region = 0;
  #failures = 0;

  constructor(regions) {
    this.regions = regions.map(([name, urls]) => [name, [...urls]]);
  }

  get region() { return this.regions[this.#region][0]; }

  get url() { return this.regions[this.#region][1][this.#index]; }

  /** Every URL, regions in order. */
  get urls() { return this.regions.flatMap(([, urls]) => urls); }

  /** The current edge failed or dropped: move on. */
  failed() {
    const urls = this.regions[this.#region][1];
    if (++this.#failures >= urls.length) {
      this.#region = (this.#region + 1) % this.regions.length;
      this.#index = 0;
      this.#failures = 0;
    } else {
      this.#index = (this.#index + 1) % urls.length;
    }
  }

  /** Welcomed: the region is good again. */
  succeeded() { this.#failures = 0; }

  /** Try the regions in `order` (names it omits keep their place after it), from the first. */
  prefer(order) {
    const rank = (name) => (order.includes(name) ? order.indexOf(name) : order.length);
    this.regions.sort((a, b) => rank(a[0]) - rank(b[0]));
    this.#region = this.#index = this.#failures = 0;
  }
}

/** `order` sorted by round trip (ms), nearest first; regions without one last, in order. */
export function rankRegions(order, rtts) {
  const key = (name) => [rtts[name] == null ? 1 : 0, rtts[name] ?? 0, order.indexOf(name)];
  return [...order].sort((a, b) => {
    const [x, y] = [key(a), key(b)];
    return x[0] - y[0] || x[1] - y[1] || x[2] - y[2];
  });
}

/** The `/healthz` URL of the edge behind a `ws(s)://host/v1/signal` URL. */
export function probeUrl(edgeUrl) {
  const url = new URL(edgeUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : url.protocol === "ws:" ? "http:" : url.protocol;
  url.pathname = "/healthz";
  url.search = "";
  return url.toString();
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

const DEFAULTS = {
  requestTimeout: 10000,
  connectTimeout: 10000,
  reconnect: true,
  maxReconnectAttempts: Infinity,
  backoff: {},
  heartbeat: null, // ms; null: the welcome's `heartbeat`
  rejoinUnrecovered: true,
  nearest: false,
  probeSamples: 3,
  probeTimeout: 1000, // ms, per sample
};

/**
 * One signalpost session, kept alive across reconnects.
 *
 * Options: `url` (string, list of edge URLs tried in turn, object of per-region lists
 * `{eu: [...], us: [...]}` tried region by region in that order (`EdgePlan`), or function
 * of the attempt number), `token` or `getToken` (async, called before every connection
 * attempt), `requestTimeout`, `connectTimeout` (ms), `reconnect`, `maxReconnectAttempts`,
 * `backoff` ({initial, maximum, factor} for `backoffDelays`), `heartbeat` (ms),
 * `rejoinUnrecovered`, `nearest` (time each region's first edge before connecting and try
 * the nearest region first: `probeSamples` GETs of its `/healthz`, each within
 * `probeTimeout` ms), `WebSocket` and `fetch` (for other runtimes).
 */
export class SignalpostClient extends EventTarget {
  #options;
  #WebSocket;
  #ws = null;
  #generation = 0; // bumped whenever a socket is abandoned; stale callbacks check it
  #state = State.IDLE;
  #nextId = 1; // never restarts: ids stay unique within the session across reconnects
  // id -> {frame, resolve, reject, timer, sent}: every request not settled yet, in id
  // order (the order to resend in). `sent`: written to some connection, so in doubt
  // until answered; unsent ones were made while (re)connecting and wait for the welcome.
  #pending = new Map();
  #holding = false; // adopting a welcome: requests made meanwhile wait behind the resends
  #rooms = new Map(); // room -> {epoch, offset, meta, members: Map(session -> peer)}
  #provisional = new Map(); // room -> {epoch, offset}: a stream reported before its joined reply
  // The highest offset seen per room and epoch, kept past a leave (bounded, oldest first):
  // a `joined` answer never starts a room below it. Room -> the epoch last known there.
  #seen = new Map(); // `${room}\u0000${epoch}` -> offset
  #epochOf = new Map();
  #watched = new Set();
  #presence = new Map(); // user -> last status told to the app
  #versions = new Map(); // user -> status version of that status (docs/protocol.md)
  #closing = false;
  #connecting = null;
  #attempt = 0;
  #heartbeatTimer = null;
  #lastFrameAt = 0;
  #wake = null; // cuts a reconnect delay short (browser back online)
  #attemptSocket = null; // the socket of a connection attempt not yet welcomed
  #onOnline = () => { if (this.#wake?.wakeable) this.#wake(); };
  #listeners = new Map(); // fn -> Map(type -> listener), for off()
  #plan = null; // EdgePlan, unless `url` is a function

  /** @param {object} options see the class comment */
  constructor(options = {}) {
    super();
    if (!options.url) throw new TypeError("SignalpostClient needs a url");
    if (!options.token && !options.getToken) throw new TypeError("SignalpostClient needs token or getToken");
    this.#options = { ...DEFAULTS, ...options };
    this.#WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof options.url !== "function") this.#plan = new EdgePlan(regionsOf(options.url));
    /** Median round trip (ms) per region measured by `measureRegions` (null: no answer). */
    this.regionRtts = {};
    /** The current session id (stable across resumes). */
    this.session = null;
    /** The user id the token names. */
    this.user = null;
    /** The last `welcome` frame. */
    this.welcome = null;
    /** The resume token of the session. */
    this.resumeToken = null;
  }

  // ------------------------------------------------------------------ state

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The URL of the current (or next) connection attempt. */
  get url() {
    const { url } = this.#options;
    if (typeof url === "function") return url(this.#attempt);
    return this.#plan.url;
  }

  /** The region of `url` ("" when the URLs were given without regions). */
  get region() {
    return this.#plan ? this.#plan.region : "";
  }

  /**
   * Time each region's first edge (`probeSamples` GETs of its `/healthz`, each within
   * `probeTimeout` ms; all regions at once), then try the regions nearest first. Any
   * answer counts as a round trip (a cross-origin answer's status cannot be read);
   * a failure or timeout does not. Resolves to `{region: ms | null}` (`regionRtts`).
   */
  async measureRegions() {
    if (!this.#plan) return {};
    const fetcher = this.#options.fetch || globalThis.fetch.bind(globalThis);
    const { probeSamples, probeTimeout } = this.#options;
    const timeOne = async (url) => {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), probeTimeout);
      const started = performance.now();
      try {
        await fetcher(url, { mode: "no-cors", cache: "no-store", signal: controller.signal });
        return performance.now() - started;
      } catch {
        return null;
      } finally {
        clearTimeout(timer);
      }
    };
    const names = this.#plan.regions.map(([name]) => name);
    const rtts = await Promise.all(this.#plan.regions.map(async ([, urls]) => {
      const samples = [];
      for (let i = 0; i < Math.max(1, probeSamples); i++) samples.push(await timeOne(probeUrl(urls[0])));
      const answered = samples.filter((x) => x !== null);
      return answered.length ? median(answered) : null;
    }));
    this.regionRtts = Object.fromEntries(names.map((name, i) => [name, rtts[i]]));
    this.#plan.prefer(rankRegions(names, this.regionRtts));
    return { ...this.regionRtts };
  }

  /** Rooms this session is a member of. */
  get rooms() {
    return [...this.#rooms.keys()];
  }

  /** `{epoch, offset, meta, members: [peer...]}` of a joined room, or null. */
  roomState(room) {
    const state = this.#rooms.get(room);
    if (!state) return null;
    return { epoch: state.epoch, offset: state.offset, meta: state.meta, members: [...state.members.values()] };
  }

  /** The other members of a joined room (peer objects). */
  members(room) {
    const state = this.#rooms.get(room);
    return state ? [...state.members.values()] : [];
  }

  /** `{room: {epoch, offset}}`: what a resuming `hello` sends. */
  positions() {
    const positions = {};
    for (const [room, { epoch, offset }] of this.#provisional) positions[room] = { epoch, offset };
    for (const [room, { epoch, offset }] of this.#rooms) positions[room] = { epoch, offset };
    return positions;
  }

  // ------------------------------------------------------------------ events

  /** Subscribe `fn(detail, event)` to `type`; returns a function that unsubscribes. */
  on(type, fn) {
    let byType = this.#listeners.get(fn);
    if (!byType) this.#listeners.set(fn, (byType = new Map()));
    if (!byType.has(type)) {
      const listener = (event) => fn(event.detail, event);
      byType.set(type, listener);
      this.addEventListener(type, listener);
    }
    return () => this.off(type, fn);
  }

  /** Unsubscribe what `on(type, fn)` subscribed. */
  off(type, fn) {
    const byType = this.#listeners.get(fn);
    const listener = byType && byType.get(type);
    if (!listener) return;
    this.removeEventListener(type, listener);
    byType.delete(type);
    if (!byType.size) this.#listeners.delete(fn);
  }

  /** A promise of the next `type` event's detail (rejects after `timeout` ms). */
  once(type, { timeout = this.#options.requestTimeout } = {}) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new SignalpostError("timeout", `no ${type} event within ${timeout} ms`));
      }, timeout);
      const off = this.on(type, (detail) => {
        clearTimeout(timer);
        off();
        resolve(detail);
      });
    });
  }

  #emit(type, detail) {
    try {
      this.dispatchEvent(new CustomEvent(type, { detail }));
    } catch (err) {
      // A throwing listener must not break the frame loop.
      setTimeout(() => { throw err; });
    }
  }

  #setState(state, extra = {}) {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    const detail = { state, previous, ...extra };
    this.#emit("state", detail);
    this.#emit(state, detail);
  }

  // ------------------------------------------------------------------ lifecycle

  /** Open the connection and authenticate; resolves with the `welcome` frame. */
  connect() {
    if (this.#state === State.OPEN) return Promise.resolve(this.welcome);
    if (this.#connecting) return this.#connecting;
    if (this.#state === State.RECONNECTING) return this.once("open").then(() => this.welcome);
    this.#closing = false;
    this.#setState(State.CONNECTING);
    this.#connecting = this.#firstOpen()
      .catch((err) => {
        this.#finish(err.closeCode ?? null, err.message, err);
        throw err;
      })
      .finally(() => {
        this.#connecting = null;
      });
    globalThis.addEventListener?.("online", this.#onOnline);
    return this.#connecting;
  }

  /**
   * The first connection: each URL of a list gets one try before giving up; an edge that
   * answers 4503 (busy) is tried again after the delay it asked for plus jitter, up to
   * `maxReconnectAttempts` times.
   */
  async #firstOpen() {
    if (this.#options.nearest && this.#plan && this.#plan.regions.length > 1) await this.measureRegions();
    const tries = this.#plan ? this.#plan.urls.length : 1;
    let busy = 0;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#open(false);
      } catch (err) {
        if (err.closeCode === CloseCode.TRY_AGAIN_LATER && !this.#closing &&
            ++busy < this.#options.maxReconnectAttempts) {
          attempt--; // not counted against the URLs: the edge asked to come back
          await this.#sleep(retryDelay(retryAfterMs(err.closeReason)), false);
          if (this.#closing) throw err;
          continue;
        }
        const refused = err.closeCode !== undefined && FINAL_CLOSE_CODES.has(err.closeCode);
        if (refused || this.#closing || attempt >= tries) throw err;
        this.#attempt++;
        this.#plan?.failed();
      }
    }
  }

  /**
   * Drop the current connection without ending the session and resume at once, on the
   * next URL (e.g. after a network change). Peers see nothing but a short pause.
   */
  reconnect() {
    if (this.#state !== State.OPEN) return;
    const ws = this.#ws;
    this.#dropped(this.#generation, CloseCode.ABNORMAL, "reconnect requested");
    try {
      ws.close(4000, "reconnecting");
    } catch {
      /* gone */
    }
  }

  /** End the session cleanly (close 1000: peers get `peer-left` at once). */
  close(reason = "bye") {
    this.#closing = true;
    this.#rejectAll(() => new SignalpostError("closed", "client closed"));
    const sockets = [this.#ws, this.#attemptSocket];
    this.#abandon();
    for (const ws of sockets) {
      if (!ws) continue;
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(CloseCode.NORMAL, reason);
      } catch {
        /* already closed */
      }
    }
    this.#finish(CloseCode.NORMAL, reason);
  }

  async #token() {
    const { token, getToken } = this.#options;
    return getToken ? await getToken() : token;
  }

  /** One connection attempt: resolves once `welcome` arrived and the socket is adopted. */
  async #open(resume) {
    let token;
    try {
      token = await this.#token();
    } catch (err) {
      throw new SignalpostError("connect_failed", `getToken failed: ${err && err.message}`);
    }
    if (this.#closing) throw new SignalpostError("closed", "client closed");
    const url = this.url;
    const hello = { type: "hello", token };
    if (resume && this.resumeToken) {
      hello.resume = this.resumeToken;
      hello.rooms = this.positions();
    }
    return new Promise((resolve, reject) => {
      const generation = ++this.#generation;
      let ws;
      try {
        ws = new this.#WebSocket(url);
      } catch (err) {
        reject(new SignalpostError("connect_failed", String(err && err.message)));
        return;
      }
      this.#attemptSocket = ws;
      let refusal = null;
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (this.#attemptSocket === ws) this.#attemptSocket = null;
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          // Not 1000: a clean close would end the session this attempt may have claimed.
          ws.close(4000, "connection attempt abandoned");
        } catch {
          /* not open yet */
        }
        reject(err);
      };
      const timer = setTimeout(
        () => fail(new SignalpostError("timeout", `no welcome from ${url} within ${this.#options.connectTimeout} ms`)),
        this.#options.connectTimeout,
      );
      ws.onopen = () => ws.send(JSON.stringify(hello));
      ws.onerror = () => {}; // a close event follows with the code
      ws.onclose = (event) => {
        const code = refusal ? refusal.code : "connect_failed";
        const message = refusal ? refusal.message : `connection to ${url} closed (${event.code})`;
        fail(new SignalpostError(code, message,
          { closeCode: event.code, closeReason: event.reason, frame: refusal }));
      };
      ws.onmessage = (event) => {
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        if (frame.type === "error") {
          refusal = frame; // the close (4401) follows
          return;
        }
        if (frame.type !== "welcome" || settled) return;
        if (generation !== this.#generation) {
          fail(new SignalpostError("closed", "client closed during the connection attempt"));
          return;
        }
        settled = true;
        clearTimeout(timer);
        this.#attemptSocket = null;
        this.#adopt(ws, generation, frame, resume);
        resolve(frame);
      };
    });
  }

  /** The welcome arrived: make `ws` the session's socket (synchronously, before more frames). */
  #adopt(ws, generation, welcome, resume) {
    const previousSession = this.session;
    this.#plan?.succeeded();
    this.#ws = ws;
    ws.onmessage = (event) => this.#onMessage(generation, event.data);
    ws.onclose = (event) => this.#dropped(generation, event.code, event.reason);
    ws.onerror = () => {};
    this.welcome = welcome;
    this.session = welcome.session;
    this.user = welcome.user;
    this.resumeToken = welcome.resume;
    this.#lastFrameAt = Date.now();
    let lostRooms = [];
    const inDoubt = [...this.#pending.values()].filter((entry) => entry.sent);
    if (welcome.resumed) {
      for (const entry of inDoubt) entry.sent = false; // resent below, same id: answered once
    } else {
      lostRooms = [...this.#rooms.keys()];
      this.#rooms.clear();
      this.#seen.clear();
      this.#epochOf.clear();
      // A new session: the old one is gone with whatever it applied of these.
      for (const entry of inDoubt) {
        this.#settle(entry, () => entry.reject(new SignalpostError("session_lost",
          `a new session began before the ${entry.frame.type} reply: it may or may not have been applied`)));
      }
    }
    this.#startHeartbeat(generation);
    this.#holding = true; // what listeners ask for now goes out after what waited
    this.#setState(State.OPEN, { session: welcome.session, resumed: welcome.resumed });
    if (resume) {
      this.#emit("resumed", {
        session: welcome.session,
        previousSession,
        resumed: Boolean(welcome.resumed),
        lostRooms,
      });
    }
    this.#holding = false;
    if (resume) this.#rewatch(); // first, then the requests that waited, oldest first
    for (const entry of [...this.#pending.values()]) {
      if (!entry.sent && this.#ws === ws) this.#transmit(entry);
    }
  }

  /** The socket of `generation` closed (or is given up on); resume unless final. */
  #dropped(generation, code, reason = "") {
    if (generation !== this.#generation || this.#closing) return;
    this.#abandon();
    const final = !this.#options.reconnect || FINAL_CLOSE_CODES.has(code);
    this.#emit("disconnected", { code, reason, willReconnect: !final });
    if (final) {
      this.#finish(code, reason);
      return;
    }
    this.#reconnect(code);
  }

  /**
   * Forget the current socket: its late events are ignored. Its requests keep waiting
   * (under their timeouts) for the resume, which sends them again.
   */
  #abandon() {
    this.#generation++;
    this.#stopHeartbeat();
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  /** The session ended for good: what still waits fails (`closed` by close() before). */
  #finish(code, reason, error) {
    this.#closing = true;
    this.#stopHeartbeat();
    if (this.#wake) this.#wake();
    globalThis.removeEventListener?.("online", this.#onOnline);
    this.#rejectAll((entry) => (entry.sent
      ? new SignalpostError("connection_lost",
        `connection closed (${code}) and not resumed before the ${entry.frame.type} reply: it may or may not have been applied`,
        { closeCode: code })
      : new SignalpostError("closed", "client closed")));
    this.#setState(State.CLOSED, { code, reason, error });
  }

  async #reconnect(code) {
    this.#setState(State.RECONNECTING, { code });
    const delays = backoffDelays(this.#options.backoff);
    let busyFor = null; // the last attempt was refused with 4503: wait what it asked
    for (let attempt = 1; attempt <= this.#options.maxReconnectAttempts; attempt++) {
      if (busyFor === null) await this.#sleep(delays.next().value);
      else await this.#sleep(retryDelay(busyFor), false);
      busyFor = null;
      if (this.#closing) return;
      // The next URL (the edge we lost may be the one that died); when every edge of the
      // region failed in a row, the next region's: the session resumes there.
      this.#attempt++;
      this.#plan?.failed();
      this.#emit("reconnect-attempt", { attempt, url: this.url });
      try {
        await this.#open(true);
        return;
      } catch (err) {
        if (this.#closing) return;
        if (err.closeCode !== undefined && FINAL_CLOSE_CODES.has(err.closeCode)) {
          this.#finish(err.closeCode, err.message, err);
          return;
        }
        if (err.closeCode === CloseCode.TRY_AGAIN_LATER) busyFor = retryAfterMs(err.closeReason);
      }
    }
    this.#finish(code, "gave up reconnecting");
  }

  /** Wait `ms`; a `wakeable` wait ends early when the browser comes back online (a 4503's
   * wait does not: the edge asked for it). `close()` ends either. */
  #sleep(ms, wakeable = true) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        if (self.#wake === done) self.#wake = null;
        resolve();
      }
      done.wakeable = wakeable;
      this.#wake = done;
    });
  }

  // ------------------------------------------------------------------ heartbeat

  #startHeartbeat(generation) {
    this.#stopHeartbeat();
    const interval = this.#options.heartbeat ?? (this.welcome?.heartbeat || 25) * 1000;
    this.#heartbeatTimer = setInterval(() => {
      if (generation !== this.#generation) return;
      if (Date.now() - this.#lastFrameAt < interval) return;
      // Quiet for a whole interval: prove the path still works, or give it up and resume.
      this.request({ type: "ping" }, { timeout: interval }).catch((err) => {
        if (err.code === "timeout" && generation === this.#generation) this.reconnect();
      });
    }, interval);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
  }

  // ------------------------------------------------------------------ frames

  #onMessage(generation, raw) {
    if (generation !== this.#generation) return;
    this.#lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    const { type } = frame;
    if (frame.id !== undefined && frame.id !== null && REPLY_TYPES.has(type)) {
      // A reply to an id not waiting (timed out, settled, or a copy) is ignored.
      const entry = this.#pending.get(frame.id);
      if (!entry) return;
      if (type === "error") {
        // Not a member after all: in the order of the answers, like a `left`.
        if (entry.frame.type === "leave" && frame.code === "not_in_room") this.#left(entry.frame.room);
        this.#settle(entry, () => entry.reject(new SignalpostError(frame.code, frame.message, { frame })));
      } else {
        this.#settle(entry, () => {
          if (type === "joined") this.#joined(frame, entry.frame.meta);
          else if (type === "left") this.#left(frame.room);
          entry.resolve(frame);
        });
      }
      return;
    }
    switch (type) {
      case "peer-joined": {
        const room = this.#track(frame);
        if (room) room.members.set(frame.peer.session, frame.peer);
        break;
      }
      case "peer-left": {
        const room = this.#track(frame);
        if (room) room.members.delete(frame.peer.session);
        break;
      }
      case "signal":
        this.#track(frame);
        break;
      case "room-closed":
        this.#track(frame); // the server's `left` (no id) follows: the room is left then
        break;
      case "left":
        this.#left(frame.room); // unasked (no id): after `room-closed`
        break;
      case "presence":
        // The status known, with a version not above its own: a repeat, dropped.
        if (
          frame.version &&
          frame.version <= (this.#versions.get(frame.user) ?? 0) &&
          frame.status === this.#presence.get(frame.user)
        )
          return;
        if (frame.version) this.#versions.set(frame.user, frame.version);
        this.#presence.set(frame.user, frame.status);
        break;
      case "recovered":
        this.#recovered(frame);
        return; // emitted once the room is settled
      case "error":
        break; // no id: emitted as an `error` event below
      default:
        break;
    }
    this.#emit(type, frame);
  }

  /** Advance the room's offset past an event; returns the room's state. */
  #track(frame) {
    const room = this.#rooms.get(frame.room) ?? this.#provisional.get(frame.room);
    if (room && typeof frame.offset === "number" && frame.offset > room.offset) room.offset = frame.offset;
    if (!room && typeof frame.offset === "number" && this.#epochOf.has(frame.room)) {
      // Its leave was answered and a join may be under way: counted in the epoch last known.
      this.#saw(frame.room, this.#epochOf.get(frame.room), frame.offset);
    }
    return this.#rooms.get(frame.room);
  }

  /** Remember that `offset` was seen in `room`'s `epoch` (bounded, oldest first). */
  #saw(room, epoch, offset) {
    const key = `${room}\u0000${epoch}`;
    const known = this.#seen.get(key);
    this.#seen.delete(key);
    this.#seen.set(key, known === undefined ? offset : Math.max(known, offset));
    if (this.#seen.size > MAX_SEEN_POSITIONS) this.#seen.delete(this.#seen.keys().next().value);
  }

  #knowEpoch(room, epoch) {
    this.#epochOf.delete(room);
    this.#epochOf.set(room, epoch);
    if (this.#epochOf.size > MAX_SEEN_POSITIONS) this.#epochOf.delete(this.#epochOf.keys().next().value);
  }

  /** A `left` reply: the room's position goes, what it had seen stays. */
  #left(room) {
    const state = this.#rooms.get(room);
    if (state) this.#saw(room, state.epoch, state.offset);
    this.#rooms.delete(room);
  }

  /** A `joined` reply: (re)set the room's position; report members that came or went. */
  #joined(frame, meta) {
    const previous = this.#rooms.get(frame.room);
    const members = new Map(frame.members.map((peer) => [peer.session, peer]));
    // A resent join is answered with the reply recorded when it was applied: within the
    // same epoch, never move back past events seen since (also those seen before this
    // reply, counted from a `recovered` report).
    const seen = previous ?? this.#provisional.get(frame.room);
    this.#provisional.delete(frame.room);
    const sameEpoch = seen && seen.epoch === frame.epoch;
    if (seen && !sameEpoch) this.#saw(frame.room, seen.epoch, seen.offset);
    // Nor past what was seen in this epoch before a leave: answers to a pipelined leave
    // and join can come late, after a resume, once events of the join were written.
    const before = this.#seen.get(`${frame.room}\u0000${frame.epoch}`) ?? 0;
    this.#rooms.set(frame.room, {
      epoch: frame.epoch,
      offset: Math.max(sameEpoch ? Math.max(seen.offset, frame.offset) : frame.offset, before),
      meta: meta ?? previous?.meta,
      members,
    });
    this.#knowEpoch(frame.room, frame.epoch);
    if (!previous) return;
    // A re-join after an unrecoverable gap: what changed in between was never seen.
    for (const [session, peer] of previous.members) {
      if (!members.has(session)) {
        this.#emit("peer-left", { type: "peer-left", room: frame.room, peer, reason: "timeout", offset: frame.offset, synthetic: true });
      }
    }
    for (const [session, peer] of members) {
      if (!previous.members.has(session)) {
        this.#emit("peer-joined", { type: "peer-joined", room: frame.room, peer, offset: frame.offset, synthetic: true });
      }
    }
  }

  #recovered(frame) {
    const room = this.#rooms.get(frame.room);
    if (typeof frame.epoch === "string" && typeof frame.offset === "number") {
      // Where the stream stands now; a room whose join is still unanswered is counted too.
      const stream = room ?? this.#provisional.get(frame.room);
      if (stream && stream.epoch === frame.epoch) stream.offset = Math.max(stream.offset, frame.offset);
      else if (stream) {
        this.#saw(frame.room, stream.epoch, stream.offset);
        Object.assign(stream, { epoch: frame.epoch, offset: frame.offset });
      } else this.#provisional.set(frame.room, { epoch: frame.epoch, offset: frame.offset });
      this.#knowEpoch(frame.room, frame.epoch);
    }
    if (frame.recovered || !room || !this.#options.rejoinUnrecovered) {
      this.#emit("recovered", frame);
      return;
    }
    // Events were lost: join again (a no-op for a member) to learn the new epoch, offset
    // and who is there, then tell the app (PeerLink restarts ICE on this event).
    this.join(frame.room, room.meta).then(
      (joined) => this.#emit("recovered", { ...frame, epoch: joined.epoch, members: joined.members }),
      (error) => {
        // Not refused: the session or the client ended, and the app is told otherwise.
        if (!["connection_lost", "session_lost", "closed"].includes(error.code)) {
          this.#rooms.delete(frame.room);
          this.#emit("room-lost", { room: frame.room, error });
        }
        this.#emit("recovered", { ...frame, error });
      },
    );
  }

  // ------------------------------------------------------------------ requests

  /**
   * Send a request frame with the next id; resolves with its reply, rejects with a
   * `SignalpostError`, exactly once. While (re)connecting the request waits, in order,
   * and goes out after the welcome; across a dropped connection it is resent with the
   * same id (see the theory of operation). `timeout` (ms) runs from this call.
   */
  request(frame, { timeout = this.#options.requestTimeout } = {}) {
    if (this.#state === State.IDLE || this.#state === State.CLOSED) {
      return Promise.reject(new SignalpostError("not_connected", `cannot send ${frame.type}: client is ${this.#state}`));
    }
    return new Promise((resolve, reject) => {
      const entry = { frame: { ...frame, id: this.#nextId++ }, resolve, reject, timer: null, sent: false };
      this.#pending.set(entry.frame.id, entry);
      entry.timer = setTimeout(() => {
        this.#settle(entry, () => reject(new SignalpostError("timeout", `no reply to ${frame.type} within ${timeout} ms`)));
      }, timeout);
      if (this.#ws && this.#state === State.OPEN && !this.#holding) this.#transmit(entry);
    });
  }

  #transmit(entry) {
    entry.sent = true; // from here on the server may have it: in doubt until answered
    try {
      this.#ws.send(JSON.stringify(entry.frame));
    } catch {
      // The socket is going: the request waits for the resume, which sends it again.
    }
  }

  /** End a waiting request once: later replies, resends and its timer find it gone. */
  #settle(entry, settle) {
    if (this.#pending.get(entry.frame.id) !== entry) return;
    this.#pending.delete(entry.frame.id);
    clearTimeout(entry.timer);
    settle();
  }

  #rejectAll(error) {
    for (const entry of [...this.#pending.values()]) this.#settle(entry, () => entry.reject(error(entry)));
  }

  /** Join `room`; resolves with the `joined` frame (epoch, offset, members). */
  join(room, meta) {
    const frame = { type: "join", room };
    if (meta !== undefined) frame.meta = meta;
    return this.request(frame);
  }

  /** Leave `room`. */
  async leave(room) {
    try {
      await this.request({ type: "leave", room });
    } catch (err) {
      if (err.code !== "not_in_room") throw err;
    }
  }

  /** Send `data` to session `to` (or every other member); resolves once acked. */
  async signal(room, data, { to, timeout } = {}) {
    const frame = { type: "signal", room, data };
    if (to) frame.to = to;
    await this.request(frame, timeout ? { timeout } : undefined);
  }

  /** Watch users' presence; resolves with `{user: "online"|"offline"}`. */
  async watch(users) {
    const reply = await this.request({ type: "watch", users });
    for (const user of users) this.#watched.add(user);
    for (const [user, status] of Object.entries(reply.presence)) this.#presence.set(user, status);
    this.#noteVersions(reply.versions);
    return reply.presence;
  }

  /** Stop watching users. */
  async unwatch(users) {
    for (const user of users) {
      this.#watched.delete(user);
      this.#presence.delete(user);
      this.#versions.delete(user);
    }
    await this.request({ type: "unwatch", users });
  }

  /** Keep the status versions of a `watching` reply (a later frame not above is old). */
  #noteVersions(versions) {
    for (const [user, version] of Object.entries(versions ?? {})) {
      if (version > (this.#versions.get(user) ?? 0)) this.#versions.set(user, version);
    }
  }

  /** Watch again after a reconnect; report statuses that changed while away. */
  #rewatch() {
    if (!this.#watched.size) return;
    const before = new Map(this.#presence);
    this.request({ type: "watch", users: [...this.#watched] }).then(
      (reply) => {
        for (const [user, status] of Object.entries(reply.presence)) {
          this.#presence.set(user, status);
          if (before.get(user) !== status) this.#emit("presence", { type: "presence", user, status, synthetic: true });
        }
        this.#noteVersions(reply.versions);
      },
      () => {},
    );
  }

  /** Round trip to the edge; resolves with the time it took in ms. */
  async ping() {
    const started = performance.now();
    await this.request({ type: "ping" });
    return performance.now() - started;
  }

  /**
   * ICE servers (RTCIceServer list) for RTCPeerConnection: the welcome's, or with
   * `{fresh: true}` newly minted TURN credentials from the edge.
   */
  async iceServers({ fresh = false } = {}) {
    if (!fresh && this.welcome && Array.isArray(this.welcome.ice_servers)) return this.welcome.ice_servers;
    const reply = await this.request({ type: "ice-servers" });
    return reply.ice_servers;
  }
}

/**
 * One RTCPeerConnection to one remote session of a room, negotiated over `signal`
 * frames with "perfect negotiation": either side may offer; on a collision the polite
 * side (the lower session id, unless `polite` is given) rolls back and answers, the
 * impolite side ignores the other offer. Remote candidates wait until a remote
 * description is set.
 *
 * Glare is survivable but costly (Chrome may not gather again after rolling back an
 * offer), so the side that joins a room with someone already in it should pass
 * `waitForOffer: true`: it lets the other side offer first and only negotiates itself
 * if no offer came within `offerTimeoutMs`.
 *
 * ICE restarts: when the room could not be recovered after a reconnect (`recovered:
 * false`), when a negotiation message may have been lost with the connection, when the
 * connection fails or stays disconnected (`disconnectedRestartMs`), and when a finished
 * negotiation does not connect within `connectTimeoutMs` (the impolite side first).
 *
 * Options: `room`, `peer` (session id or peer object), `iceServers`, `rtcConfig`,
 * `polite`, `waitForOffer`, `offerTimeoutMs` (3000), `connectTimeoutMs` (8000),
 * `disconnectedRestartMs` (4000), `listen` (default true: take this peer's signals from
 * the client; false: call `handleSignal(data)` yourself).
 *
 * Events (`on(type, fn)` / addEventListener, detail in `event.detail`): `track`
 * ({track, streams}), `datachannel` ({channel}), `state` ({connectionState,
 * iceConnectionState, signalingState}), `data` (app data signalled by the peer),
 * `restart` ({reason}), `error` ({error}), `closed`.
 */
export class PeerLink extends EventTarget {
  #client;
  #makingOffer = false;
  #ignoreOffer = false;
  #waitingForOffer = false;
  #candidates = []; // remote candidates waiting for a remote description
  #inbox = Promise.resolve(); // remote descriptions and candidates, applied one at a time
  #unsent = false; // a negotiation message may have been lost with the connection
  #offs = [];
  #timers = { offer: null, connect: null, disconnected: null };
  #options;

  constructor(client, options = {}) {
    super();
    const { room, peer } = options;
    if (!room || !peer) throw new TypeError("PeerLink needs room and peer");
    this.#client = client;
    this.#options = {
      listen: true,
      waitForOffer: false,
      offerTimeoutMs: 3000,
      connectTimeoutMs: 8000,
      disconnectedRestartMs: 4000,
      ...options,
    };
    this.room = room;
    this.remote = typeof peer === "string" ? peer : peer.session;
    this.peer = typeof peer === "string" ? { session: peer } : peer;
    this.polite = options.polite ?? String(client.session) < String(this.remote);
    this.closed = false;
    const RTC = options.RTCPeerConnection || globalThis.RTCPeerConnection;
    const config = { ...(options.rtcConfig || {}) };
    if (options.iceServers) config.iceServers = options.iceServers;
    /** The wrapped RTCPeerConnection: add tracks and data channels to it. */
    this.pc = new RTC(config);
    if (this.#options.waitForOffer) {
      this.#waitingForOffer = true;
      this.#timers.offer = setTimeout(() => {
        if (!this.#waitingForOffer) return;
        this.#waitingForOffer = false;
        this.restartIce("no offer came: negotiating ourselves");
      }, this.#options.offerTimeoutMs);
    }
    this.#wire();
  }

  on(type, fn) {
    const listener = (event) => fn(event.detail, event);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #wire() {
    const { pc } = this;
    pc.onnegotiationneeded = async () => {
      if (this.#waitingForOffer || this.closed) return; // the browser asks again once stable
      try {
        this.#makingOffer = true;
        await pc.setLocalDescription();
      } catch (error) {
        this.#emit("error", { error });
        return;
      } finally {
        this.#makingOffer = false;
      }
      // A colliding remote offer may have rolled ours back already: never send that one.
      if (pc.signalingState === "have-local-offer" && pc.localDescription.type === "offer") {
        this.#send({ kind: "offer", sdp: pc.localDescription.sdp }, true);
      }
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate) this.#send({ kind: "candidate", candidate: candidate.toJSON() }, false);
    };
    pc.ontrack = ({ track, streams }) => this.#emit("track", { track, streams });
    pc.ondatachannel = ({ channel }) => this.#emit("datachannel", { channel });
    const report = () => {
      if (this.closed) return;
      this.#emit("state", {
        connectionState: pc.connectionState,
        iceConnectionState: pc.iceConnectionState,
        signalingState: pc.signalingState,
      });
      this.#watchHealth();
    };
    pc.onconnectionstatechange = report;
    pc.oniceconnectionstatechange = report;
    pc.onsignalingstatechange = report;

    const client = this.#client;
    if (this.#options.listen) {
      this.#offs.push(
        client.on("signal", ({ room, from, data }) => {
          if (room === this.room && from && from.session === this.remote) this.handleSignal(data);
        }),
      );
    }
    this.#offs.push(
      client.on("recovered", ({ room, recovered }) => {
        if (room === this.room && !recovered) this.restartIce("signaling events lost");
      }),
      client.on("resumed", ({ resumed }) => {
        if (resumed && this.#unsent) this.restartIce("negotiation interrupted by a reconnect");
      }),
    );
  }

  #restartLater(name, ms, reason, stillNeeded) {
    if (this.#timers[name]) return;
    this.#timers[name] = setTimeout(() => {
      this.#timers[name] = null;
      if (!this.closed && stillNeeded()) this.restartIce(reason);
    }, ms);
  }

  #cancel(name) {
    clearTimeout(this.#timers[name]);
    this.#timers[name] = null;
  }

  /** Restart ICE when media fails, stays disconnected, or a negotiation never connects. */
  #watchHealth() {
    const { pc } = this;
    const state = pc.connectionState;
    if (state === "connected" || state === "closed") {
      this.#cancel("connect");
      this.#cancel("disconnected");
      return;
    }
    if (state === "failed") {
      this.#cancel("disconnected");
      this.restartIce("connection failed");
      return;
    }
    if (state === "disconnected") {
      this.#restartLater("disconnected", this.#options.disconnectedRestartMs, "connection disconnected",
        () => pc.connectionState === "disconnected");
    }
    if (pc.signalingState === "stable" && pc.remoteDescription && (state === "new" || state === "connecting")) {
      // Negotiated but not connecting (e.g. no candidates after a glare rollback). The
      // impolite side acts first so that both do not restart into another collision.
      const wait = this.#options.connectTimeoutMs * (this.polite ? 2 : 1);
      this.#restartLater("connect", wait, "negotiated but not connected",
        () => pc.signalingState === "stable" && ["new", "connecting"].includes(pc.connectionState));
    }
  }

  async #send(data, negotiation) {
    if (this.closed) return;
    try {
      await this.#client.signal(this.room, data, { to: this.remote });
    } catch (error) {
      if (this.closed) return;
      if (["connection_lost", "session_lost", "timeout", "not_connected"].includes(error.code)) {
        // Maybe delivered, maybe not: renegotiate once the session is back.
        if (negotiation || this.pc.connectionState !== "connected") this.#unsent = true;
        if (this.#client.state === State.OPEN && this.#unsent) this.restartIce("a negotiation message was lost");
      } else {
        this.#emit("error", { error });
      }
    }
  }

  /** Apply one message from the remote peer (`{kind, sdp}` or `{kind: "candidate", candidate}`). */
  handleSignal(data) {
    this.#inbox = this.#inbox.then(() => this.#apply(data)).catch((error) => this.#emit("error", { error }));
    return this.#inbox;
  }

  async #apply(data) {
    if (this.closed || !data || typeof data !== "object") return;
    const { pc } = this;
    if (data.kind === "offer" || data.kind === "answer") {
      const offerCollision = data.kind === "offer" && (this.#makingOffer || pc.signalingState !== "stable");
      this.#ignoreOffer = !this.polite && offerCollision;
      if (this.#ignoreOffer) return;
      if (data.kind === "answer" && pc.signalingState !== "have-local-offer") return; // stale answer
      if (data.kind === "offer") {
        this.#waitingForOffer = false;
        this.#cancel("offer");
      }
      await pc.setRemoteDescription({ type: data.kind, sdp: data.sdp });
      const waiting = this.#candidates;
      this.#candidates = [];
      for (const candidate of waiting) await this.#addCandidate(candidate);
      if (data.kind === "offer") {
        await pc.setLocalDescription();
        this.#send({ kind: "answer", sdp: pc.localDescription.sdp }, true);
      }
      this.#watchHealth();
    } else if (data.kind === "candidate") {
      if (!data.candidate) return;
      if (!pc.remoteDescription) this.#candidates.push(data.candidate);
      else await this.#addCandidate(data.candidate);
    } else {
      this.#emit("data", data);
    }
  }

  async #addCandidate(candidate) {
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (error) {
      // Candidates of an offer we ignored, or of a generation an ICE restart replaced.
      if (!this.#ignoreOffer && this.pc.remoteDescription) this.#emit("error", { error, candidate });
    }
  }

  /** Renegotiate with fresh ICE credentials (either side may call it). */
  async restartIce(reason = "requested") {
    if (this.closed) return;
    this.#unsent = false;
    this.#waitingForOffer = false;
    this.#cancel("offer");
    this.#cancel("connect");
    this.#emit("restart", { reason });
    const { pc } = this;
    if (pc.signalingState === "have-local-offer" && !this.#makingOffer) {
      // Our offer may never have arrived: take it back so a new one can go out.
      try {
        await pc.setLocalDescription({ type: "rollback" });
      } catch {
        /* nothing to roll back */
      }
    }
    if (!this.closed) pc.restartIce();
  }

  /** Close the peer connection and stop listening. */
  close() {
    if (this.closed) return;
    this.closed = true;
    for (const name of Object.keys(this.#timers)) this.#cancel(name);
    for (const off of this.#offs) off();
    this.#offs = [];
    try {
      this.pc.close();
    } catch {
      /* closed */
    }
    this.#emit("closed", {});
  }
}
