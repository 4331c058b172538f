// Model output -> safe HTML. The model's text is untrusted: markdown-it escapes any HTML in it
// (html: false), DOMPurify keeps only the tags Markdown produces, and nothing can load or run:
// no images, no styles, no event handlers, links open in a new tab without a referrer.
"use strict";

const Markdown = (() => {
  const md = window.markdownit({ html: false, linkify: true, typographer: false });
  md.disable("image");  // ![alt](src) stays text: an answer never makes the browser fetch anything

  const ALLOWED_TAGS = ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol",
                        "li", "pre", "code", "em", "strong", "s", "a", "table", "thead", "tbody",
                        "tr", "th", "td"];
  // No `style`: markdown-it aligns table cells with it, and the page's CSP refuses inline styles.
  const ALLOWED_ATTR = ["href", "title", "start", "class"];

  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeType !== Node.ELEMENT_NODE) return;
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    } else if (node.hasAttribute("class") && !/^language-[\w+#.-]+$/.test(node.getAttribute("class"))) {
      node.removeAttribute("class");  // only the fence's language-xxx class survives
    }
  });

  function html(source) {
    return window.DOMPurify.sanitize(md.render(source), {
      ALLOWED_TAGS, ALLOWED_ATTR, ADD_ATTR: ["target"], ALLOW_DATA_ATTR: false,
    });
  }

  function copyButton(label, text) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy quiet small";
    button.textContent = "Copy";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", () => copyText(button, typeof text === "function" ? text() : text));
    return button;
  }

  // Render `source` into `element`; each code block gets its own copy button.
  function renderInto(element, source) {
    element.innerHTML = html(source);
    for (const pre of element.querySelectorAll("pre")) {
      const box = document.createElement("div");
      box.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const language = document.createElement("span");
      const fence = /^language-(.+)$/.exec(pre.firstElementChild?.className || "");
      language.textContent = fence ? fence[1] : "";
      head.append(language, copyButton("Copy the code", () => pre.textContent));
      pre.replaceWith(box);
      box.append(head, pre);
    }
  }

  return { html, renderInto, copyButton };
})();

// navigator.clipboard needs a secure context (localhost counts); say so when it is refused.
function copyText(button, text) {
  const done = (label) => {
    button.textContent = label;
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  };
  if (!navigator.clipboard) {
    done("Copy failed");
    return;
  }
  navigator.clipboard.writeText(text).then(() => done("Copied"), () => done("Copy failed"));
}
