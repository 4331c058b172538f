// An EventSource from the `eventsource` package, left open as careless clients leave it: it
// prints every event as a JSON line and, as the spec says, reconnects by itself with its
// Last-Event-ID, until the server answers 204. Usage: node follow.mjs URL SECONDS
import { EventSource } from "eventsource";

const [url, seconds] = process.argv.slice(2);
const say = (line) => console.log(JSON.stringify(line));
const source = new EventSource(url);
source.addEventListener("open", () => say({ type: "open" }));
for (const type of ["meta", "update", "reasoning", "finish"]) {
  source.addEventListener(type, (e) => say({ type, data: e.data, id: e.lastEventId }));
}
source.addEventListener("error", (e) => {
  // The server's own `event: error` frame has data; a connection error has none.
  say(e.data === undefined ? { type: "connection-error", readyState: source.readyState, code: e.code ?? null }
                           : { type: "error", data: e.data });
});
setTimeout(() => {
  say({ type: "done", readyState: source.readyState });
  source.close();
}, Number(seconds) * 1000);
