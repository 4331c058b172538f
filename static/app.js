// The chat page: the conversation as turns, the composer, and sessionStorage so that a reload
// keeps everything on screen. An answer still streaming at reload is resumed by id, never re-asked.
"use strict";

const STORAGE_KEY = "tornado-sse.chat.v1";
const chat = document.getElementById("chat");
const form = document.getElementById("form-question");
const input = document.getElementById("input");
const askButton = document.getElementById("ask");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");
const conversationBox = document.getElementById("conversation");
const emptyHint = document.getElementById("empty");
const turnTemplate = document.getElementById("turn-template");
const resumeGrace = parseFloat(chat.dataset.resumeGrace) || 0;

const NOTES = {
  stopped: "Stopped.",
  lost: "The connection was lost, so the answer above was cut off.",
  reconnecting: "The connection was lost; reconnecting…",
};
// An answer that ended normally but not by the model's own choice says why, in words.
const CUT = {
  length: "The answer was cut off: it reached the length limit set on this server.",
  content_filter: "The model provider's content filter stopped this answer.",
};
const REFUSED = "The server did not accept the question (it may be too long, rate-limited or need sign-in).";
const UNREACHABLE = "The server could not be reached. Check the connection and try again.";

// state.turns[i]: {question, answer, reasoning, status, note, error, metrics, restarted, lastEventId}
// status: "streaming" | "done" | "stopped" | "lost" | "error"
let state = load();
let active = null;  // {turn, view, stream} while an answer streams

function load() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY));
    if (saved && Array.isArray(saved.turns)) return saved;
  } catch (_) { /* start afresh */ }
  return { conversation: null, turns: [] };
}

function save() {
  try {
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify(state));
  } catch (_) { /* storage full or disabled: the page still works, a reload forgets */ }
}

// Saving on every token would copy the whole answer each time; once a second is plenty, because
// a reload saves first (pagehide) and the answer and its last event id are always saved together.
let saveTimer = null;
function saveSoon() {
  if (saveTimer === null) saveTimer = setTimeout(() => { saveTimer = null; save(); }, 1000);
}
window.addEventListener("pagehide", save);

// ---- the view of one turn ----

function addTurnView(turn) {
  const node = turnTemplate.content.firstElementChild.cloneNode(true);
  const view = {
    node,
    question: node.querySelector(".question"),
    restarted: node.querySelector(".restarted"),
    thinkingBox: node.querySelector(".thinking"),
    thinking: node.querySelector(".thinking-text"),
    body: node.querySelector(".answer-body"),
    note: node.querySelector(".turn-note"),
    error: node.querySelector(".turn-error"),
    errorText: node.querySelector(".turn-error-text"),
    metrics: node.querySelector(".metrics"),
    copy: node.querySelector(".copy-answer"),
    renderPending: false,
  };
  view.question.textContent = turn.question;
  view.copy.addEventListener("click", () => copyText(view.copy, turn.answer));
  node.querySelector(".retry").addEventListener("click", () => retry(turn));
  // The latest turn keeps the ids the first version of the page had.
  for (const id of ["question", "result"]) document.getElementById(id)?.removeAttribute("id");
  view.question.id = "question";
  view.body.id = "result";
  conversationBox.append(node);
  emptyHint.hidden = true;
  showTurn(turn, view);
  return view;
}

function showTurn(turn, view) {
  Markdown.renderInto(view.body, turn.answer);
  view.body.dataset.source = turn.answer;
  view.thinkingBox.hidden = !turn.reasoning;
  view.thinking.textContent = turn.reasoning;
  view.restarted.hidden = !turn.restarted;
  view.node.dataset.status = turn.status;
  view.note.textContent = turn.note || "";
  view.error.hidden = !turn.error;
  view.errorText.textContent = turn.error || "";
  view.metrics.textContent = turn.metrics || "";
  view.copy.hidden = turn.status === "streaming" || !turn.answer;
}

// Re-render the whole answer at most once per frame, however fast the tokens come, and keep the
// view on the answer as it grows unless the reader has scrolled up.
function renderSoon(turn, view) {
  if (view.renderPending) return;
  view.renderPending = true;
  requestAnimationFrame(() => {
    view.renderPending = false;
    const root = document.documentElement;
    const following = root.scrollHeight - (window.scrollY + window.innerHeight) < 48;
    showTurn(turn, view);
    if (following) window.scrollTo(0, root.scrollHeight);
  });
}

// ---- asking ----

function setBusy(busy) {
  askButton.disabled = busy;
  stopButton.hidden = !busy;
  conversationBox.setAttribute("aria-busy", String(busy));
}

function ask(question) {
  const turn = { question, answer: "", reasoning: "", status: "streaming", note: "", error: "",
                 metrics: "", restarted: false, lastEventId: null };
  state.turns.push(turn);
  const view = addTurnView(turn);
  window.scrollTo(0, document.documentElement.scrollHeight);
  let url = "/ask?question=" + encodeURIComponent(question);
  if (state.conversation) url += "&conversation=" + encodeURIComponent(state.conversation);
  follow(turn, view, url, false);
  save();
}

function follow(turn, view, url, resumed) {
  setBusy(true);
  const stream = new AnswerStream(url, { resumeGrace, resumed, on: {
    meta(meta) {
      if (meta.conversation) state.conversation = meta.conversation;
      if (meta.restarted) turn.restarted = true;
      renderSoon(turn, view);
    },
    update(text) {
      turn.answer += text;
      turn.metrics = stream.metrics();
      if (turn.note) turn.note = "";  // "reconnecting" is over
      renderSoon(turn, view);
    },
    reasoning(text) {
      turn.reasoning += text;
      renderSoon(turn, view);
    },
    progress() {
      turn.lastEventId = stream.lastEventId;
      saveSoon();
    },
    reconnecting() {
      turn.note = NOTES.reconnecting;
      renderSoon(turn, view);
    },
    done(outcome) {
      finishTurn(turn, outcome, stream);
      active = null;
      setBusy(false);
      renderSoon(turn, view);
      save();
      if (document.activeElement === document.body) input.focus();
    },
  } });
  active = { turn, view, stream };
}

function finishTurn(turn, outcome, stream) {
  turn.metrics = stream.metrics() || turn.metrics;
  turn.lastEventId = null;
  turn.note = "";
  if (outcome.kind === "end") {
    turn.status = "done";
    turn.note = Object.hasOwn(CUT, outcome.reason ?? "") ? CUT[outcome.reason] : "";
  } else if (outcome.kind === "stopped") {
    turn.status = "stopped";
    turn.note = NOTES.stopped;
  } else if (outcome.kind === "lost") {
    turn.status = "lost";
    turn.note = NOTES.lost;
  } else {
    turn.status = "error";
    turn.error = outcome.kind === "error" ? outcome.message
      : outcome.kind === "refused" ? REFUSED : UNREACHABLE;
  }
}

// Retry only ever runs on a click. A failed last turn is asked again in its place.
function retry(turn) {
  if (active) return;
  const index = state.turns.indexOf(turn);
  if (index === state.turns.length - 1) {
    state.turns.pop();
    conversationBox.lastElementChild.remove();
  }
  ask(turn.question);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = input.value.trim();
  if (question === "" || active) return;
  input.value = "";
  ask(question);
});

// Enter sends; Shift+Enter (and Enter while an input method composes) adds a line.
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => active?.stream.stop());

newChatButton.addEventListener("click", () => {
  active?.stream.stop({ leaving: true });
  state = { conversation: null, turns: [] };
  conversationBox.replaceChildren();
  emptyHint.hidden = false;
  save();
  input.focus();
});

// ---- a reload: show what was there, and pick up an answer that was still streaming ----

for (const turn of state.turns) {
  const view = addTurnView(turn);
  if (turn.status !== "streaming") continue;
  if (resumeGrace > 0 && turn.lastEventId && turn === state.turns.at(-1)) {
    follow(turn, view, "/ask?resume=" + encodeURIComponent(turn.lastEventId), true);
  } else {
    finishTurn(turn, { kind: "lost" }, { metrics: () => "" });
    showTurn(turn, view);
    save();
  }
}
if (state.turns.length) window.scrollTo(0, document.documentElement.scrollHeight);
