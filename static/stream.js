// One answer's Server-Sent Events stream. The EventSource is closed on the end frame, on every
// `error` event and on every connection error, so the browser never reconnects on its own and asks
// the question again. A dropped connection is resumed only by id (`/ask?resume=<stream>.<seq>`,
// which replays, never regenerates), and only while the server keeps the stream (resume_grace);
// a resume the server answers with 204 (nothing left to send) shows the answer as cut off.
"use strict";

const END_MARKER = "<END_STREAMING_SSE>";
const STOP_WAIT_MS = 3000;  // after Stop, how long the server has to end the stream itself

class AnswerStream {
  // url: "/ask?question=..." or "/ask?resume=...". `on` holds the callbacks:
  //   meta(meta), update(text), reasoning(text), progress() after each event (lastEventId is current),
  //   reconnecting(), done(outcome) once, with outcome.kind one of
  //   "end" (reason: the `finish` event's, e.g. "stop", "length", "content_filter") |
  //   "error" (code, message) | "lost" | "refused" | "unreachable" | "stopped".
  constructor(url, { resumeGrace = 0, resumed = false, on }) {
    this.on = on;
    this.resumeGrace = resumeGrace;
    this.resumed = resumed;  // opened after a reload: no first-token time to measure
    this.streamId = null;
    this.lastEventId = resumed ? new URL(url, location.href).searchParams.get("resume") : null;
    this.heardFromServer = resumed;
    this.finished = false;
    this.finishReason = null;  // from the `finish` event just before the end frame
    this.stopping = false;  // Stop was pressed; the server's end frame is awaited
    this.stopTimer = null;
    this.droppedAt = null;
    this.retryTimer = null;
    // Speed: first token time from opening to the first update; tokens/s over the updates.
    this.openedAt = performance.now();
    this.firstUpdateAt = null;
    this.lastUpdateAt = null;
    this.updates = 0;
    this.open(url);
  }

  open(url) {
    const source = new EventSource(url);
    this.source = source;
    this.heardOnSource = false;  // (a page being left also closes a source that was streaming)
    source.addEventListener("meta", (e) => {
      this.heard(e);
      let meta = {};
      try { meta = JSON.parse(e.data); } catch (_) { /* keep {} */ }
      if (meta.stream) this.streamId = meta.stream;
      this.on.meta(meta);
      this.on.progress();
    });
    source.addEventListener("update", (e) => {
      this.heard(e);
      if (e.data === END_MARKER) {
        const stopped = this.stopping || this.finishReason === "stopped";
        this.finish(stopped ? { kind: "stopped" } : { kind: "end", reason: this.finishReason });
        return;
      }
      const now = performance.now();
      if (this.firstUpdateAt === null) this.firstUpdateAt = now;
      this.lastUpdateAt = now;
      this.updates += 1;
      this.on.update(e.data);
      this.on.progress();
    });
    source.addEventListener("finish", (e) => {
      this.heard(e);
      try { this.finishReason = JSON.parse(e.data).reason || null; } catch (_) { /* keep null */ }
      this.on.progress();
    });
    source.addEventListener("reasoning", (e) => {
      this.heard(e);
      this.on.reasoning(e.data);
      this.on.progress();
    });
    source.addEventListener("error", (e) => {
      if (source !== this.source || this.finished) return;
      if (e.data !== undefined) {  // the server's own error event; its end frame follows
        let error = {};
        try { error = JSON.parse(e.data); } catch (_) { /* keep {} */ }
        this.finish({ kind: "error", code: error.code || "error", message: error.message || "The answer failed." });
        return;
      }
      // A connection error. Close now: left open, the EventSource would ask again by itself.
      const refused = source.readyState === EventSource.CLOSED;  // a non-200 answer, or not SSE
      source.close();
      if (!this.heardFromServer) {
        this.finish({ kind: refused ? "refused" : "unreachable" });
      } else if (refused && !this.heardOnSource) {  // a resume answered 204: nothing left to send
        this.finish({ kind: "lost" });
      } else if (this.canResume()) {
        this.resumeSoon();
      } else {
        this.finish({ kind: "lost" });
      }
    });
  }

  heard(e) {
    this.heardFromServer = true;
    this.heardOnSource = true;
    this.droppedAt = null;
    if (e.lastEventId) this.lastEventId = e.lastEventId;
  }

  canResume() {
    if (this.resumeGrace <= 0 || !this.lastEventId) return false;
    if (this.droppedAt === null) this.droppedAt = performance.now();
    return performance.now() - this.droppedAt < this.resumeGrace * 1000;
  }

  resumeSoon() {
    this.on.reconnecting();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (!this.finished) this.open("/ask?resume=" + encodeURIComponent(this.lastEventId));
    }, 1000);
  }

  // Stop: the server aborts the generation and ends this stream itself, with `finish` "stopped"
  // and the end frame (closing first would race it: the server might see a dropped reader, and
  // /stop an answer already gone). Only when that cannot happen (no stream id yet, /stop
  // refused or unreachable, no end within STOP_WAIT_MS) does the page close the stream itself.
  // `leaving` (New chat): nothing will show the end, so close at once and only tell the server.
  stop({ leaving = false } = {}) {
    if (this.finished || (this.stopping && !leaving)) return;
    this.stopping = true;
    const closeNow = () => this.finish({ kind: "stopped" });
    if (this.streamId) {
      fetch("/stop?stream=" + encodeURIComponent(this.streamId), { method: "POST", keepalive: leaving })
        .then((response) => { if (!response.ok) closeNow(); }, closeNow);
    }
    if (leaving || !this.streamId) {
      closeNow();
    } else {
      this.stopTimer = setTimeout(closeNow, STOP_WAIT_MS);
    }
  }

  finish(outcome) {
    if (this.finished) return;
    this.finished = true;
    this.source.close();
    clearTimeout(this.retryTimer);
    clearTimeout(this.stopTimer);
    this.on.done(outcome);
  }

  // "first token 312 ms · 24.5 tok/s", or "" before there is anything to measure.
  metrics() {
    const parts = [];
    if (!this.resumed && this.firstUpdateAt !== null) {
      parts.push(`first token ${Math.round(this.firstUpdateAt - this.openedAt)} ms`);
    }
    const seconds = (this.lastUpdateAt - this.firstUpdateAt) / 1000;
    if (this.updates > 1 && seconds > 0) parts.push(`${(this.updates / seconds).toFixed(1)} tok/s`);
    return parts.join(" · ");
  }
}
