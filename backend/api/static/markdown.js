// Markdown for model output, rendered without HTML: every node is made with createElement and every piece of text is
// a text node, so nothing the model writes (<script>, <img onerror>, javascript: links) is ever parsed as markup.
// Supported: fenced code blocks, headings, bullet and numbered lists, block quotes, horizontal rules, paragraphs;
// inline code, **bold**, *italic* / _italic_, ~~strike~~ and [links](http://...) with http(s) and mailto targets only.

const SAFE_URL = /^(https?:\/\/|mailto:)/i;
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*([^*]+?)\*\*|__([^_]+?)__|~~([^~]+?)~~|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b|\[([^\]]+)\]\(([^)\s]+)\)/g;

function el(tag, children = [], attrs = {}) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

/** Inline markdown of `text` as an array of nodes (text nodes and elements). */
export function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1] !== undefined) out.push(el("code", [m[2]]));
    else if (m[3] !== undefined || m[4] !== undefined) out.push(el("strong", inline(m[3] ?? m[4])));
    else if (m[5] !== undefined) out.push(el("del", inline(m[5])));
    else if (m[6] !== undefined || m[7] !== undefined) out.push(el("em", inline(m[6] ?? m[7])));
    else if (SAFE_URL.test(m[9])) {
      out.push(el("a", inline(m[8]), { href: m[9], target: "_blank", rel: "noopener noreferrer nofollow" }));
    } else out.push(document.createTextNode(m[0]));
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

function paragraph(lines) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i) nodes.push(el("br"));
    nodes.push(...inline(line));
  });
  return el("p", nodes);
}

const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

/** Block markdown of `text` as a DocumentFragment. An unclosed code fence (mid-stream) runs to the end. */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      const code = el("code", [body.join("\n")]);
      if (fence[2]) code.className = `language-${fence[2].replace(/[^\w+#.-]/g, "")}`;
      frag.append(el("pre", [code]));
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const heading = line.match(HEADING);
    if (heading) { frag.append(el(`h${heading[1].length}`, inline(heading[2]))); i++; continue; }
    if (RULE.test(line)) { frag.append(el("hr")); i++; continue; }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) body.push(lines[i++].match(QUOTE)[1]);
      frag.append(el("blockquote", [renderMarkdown(body.join("\n"))]));
      continue;
    }
    const list = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
    if (list) {
      const items = [];
      const start = list === NUMBERED ? line.match(NUMBERED)[1] : null;
      while (i < lines.length && list.test(lines[i])) {
        const m = lines[i++].match(list);
        items.push(el("li", inline(m[m.length - 1])));
      }
      frag.append(el(list === BULLET ? "ul" : "ol", items, start && start !== "1" ? { start } : {}));
      continue;
    }
    const body = [];
    while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
           && !BULLET.test(lines[i]) && !NUMBERED.test(lines[i]) && !QUOTE.test(lines[i])) body.push(lines[i++]);
    frag.append(paragraph(body));
  }
  return frag;
}
