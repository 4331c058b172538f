// Ask a question, stream the answer over Server-Sent Events, and never ask twice by itself:
// the EventSource is closed on the end frame, on every error and on Stop, so it cannot reconnect.
"use strict";

const END = "<END_STREAMING_SSE>";
const form = document.getElementById("form-question");
const input = document.getElementById("input");
const askButton = document.getElementById("ask");
const stopButton = document.getElementById("stop");
const question = document.getElementById("question");
const result = document.getElementById("result");
const reasoningBox = document.getElementById("reasoning-box");
const reasoning = document.getElementById("reasoning");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");

let source = null;

function finish(status) {
  if (source) source.close();
  source = null;
  askButton.disabled = false;
  stopButton.hidden = true;
  result.setAttribute("aria-busy", "false");
  statusLine.textContent = status;
}

function fail(message) {
  errorLine.textContent = message;
  errorLine.hidden = false;
  finish("");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (text === "" || source) return;

  question.textContent = text;
  input.value = "";
  result.textContent = "";
  reasoning.textContent = "";
  reasoningBox.hidden = true;
  errorLine.hidden = true;
  statusLine.textContent = "";
  askButton.disabled = true;
  stopButton.hidden = false;
  result.setAttribute("aria-busy", "true");

  // Text nodes, never HTML: the model's output cannot become markup. appendData keeps each
  // delta O(its own length) however long the answer grows.
  const answer = result.appendChild(document.createTextNode(""));
  const thinking = reasoning.appendChild(document.createTextNode(""));
  let received = false;

  source = new EventSource("/ask?question=" + encodeURIComponent(text));
  source.addEventListener("update", (e) => {
    if (e.data === END) {
      finish("");
      return;
    }
    received = true;
    answer.appendData(e.data);
  });
  source.addEventListener("reasoning", (e) => {
    reasoningBox.hidden = false;
    thinking.appendData(e.data);
  });
  source.addEventListener("error", (e) => {
    if (e.data) {
      // The server's own error event; its end frame follows, but stop listening now.
      let message = "The answer failed.";
      try { message = JSON.parse(e.data).message || message; } catch (_) { /* keep default */ }
      fail(message);
    } else if (received) {
      fail("The connection was lost; the answer above was cut off.");
    } else {
      fail("The server did not accept the question, or could not be reached.");
    }
  });
});

stopButton.addEventListener("click", () => {
  if (!source) return;
  finish("Stopped.");  // closing the EventSource makes the server abort the generation
});
