/**
 * A small ordered XML tree: parsed with fast-xml-parser (entities off, DOCTYPE refused) and
 * written back by our own canonical serializer, so that normalizing twice gives the same text.
 * Every element, attribute, text and comment the user gave survives the round trip.
 */
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { DomainXmlError } from '../errors.js';

export interface XElement {
  kind: 'element';
  name: string;
  /** Insertion-ordered, entity-decoded. */
  attrs: Map<string, string>;
  children: XChild[];
}
export interface XText {
  kind: 'text';
  text: string;
}
export interface XComment {
  kind: 'comment';
  text: string;
}
export type XChild = XElement | XText | XComment;

const invalid = (message: string) => new DomainXmlError('invalid_xml', '/', message);

// XML 1.0 forbids these characters anywhere in a document.
const FORBIDDEN_CHARS = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\uFFFE\uFFFF]/;
const ENTITY = /&(?:#x([0-9a-fA-F]{1,6})|#([0-9]{1,7})|(lt|gt|amp|quot|apos));|&/g;
const NAMED: Record<string, string> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'" };

function isXmlChar(cp: number): boolean {
  return cp === 0x9 || cp === 0xa || cp === 0xd || (cp >= 0x20 && cp <= 0xd7ff) ||
    (cp >= 0xe000 && cp <= 0xfffd) || (cp >= 0x10000 && cp <= 0x10ffff);
}

/** Decodes the five predefined entities and character references; anything else is refused. */
function decodeEntities(s: string): string {
  return s.replace(ENTITY, (m, hex: string | undefined, dec: string | undefined, named: string | undefined) => {
    if (named) return NAMED[named]!;
    if (hex === undefined && dec === undefined) throw invalid(`unknown entity reference or stray '&' near '${s.slice(0, 40)}'`);
    const cp = hex !== undefined ? parseInt(hex, 16) : parseInt(dec!, 10);
    if (!isXmlChar(cp)) throw invalid(`character reference ${m} is not a legal XML character`);
    return String.fromCodePoint(cp);
  });
}

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  parseAttributeValue: false,
  parseTagValue: false,
  trimValues: true,
  processEntities: false,
  htmlEntities: false,
  allowBooleanAttributes: false,
  ignoreDeclaration: true,
  ignorePiTags: true,
  commentPropName: '#comment',
  cdataPropName: '#cdata',
});

type RawNode = Record<string, unknown>;

function rawText(nodes: unknown): string {
  return (nodes as RawNode[]).map((n) => String(n['#text'] ?? '')).join('');
}

function convert(nodes: RawNode[]): XChild[] {
  const out: XChild[] = [];
  const pushText = (text: string) => {
    if (text === '') return;
    const last = out[out.length - 1];
    if (last?.kind === 'text') last.text += text;
    else out.push({ kind: 'text', text });
  };
  for (const node of nodes) {
    if ('#text' in node) {
      pushText(decodeEntities(String(node['#text'])));
    } else if ('#cdata' in node) {
      pushText(rawText(node['#cdata'])); // CDATA is literal: no entity decoding
    } else if ('#comment' in node) {
      out.push({ kind: 'comment', text: rawText(node['#comment']) });
    } else {
      const name = Object.keys(node).find((k) => k !== ':@');
      if (name === undefined) continue;
      const attrs = new Map<string, string>();
      const rawAttrs = (node[':@'] ?? {}) as Record<string, unknown>;
      for (const [k, v] of Object.entries(rawAttrs)) attrs.set(k, decodeEntities(String(v)));
      out.push({ kind: 'element', name, attrs, children: convert(node[name] as RawNode[]) });
    }
  }
  return out;
}

/** Parses a document into its root element; refuses DOCTYPE/ENTITY and malformed XML. */
export function parseXmlTree(xml: string): XElement {
  if (typeof xml !== 'string' || xml.trim() === '') throw invalid('empty document');
  if (/<!DOCTYPE/i.test(xml) || /<!ENTITY/i.test(xml)) {
    throw invalid('DOCTYPE and ENTITY declarations are not allowed');
  }
  if (FORBIDDEN_CHARS.test(xml)) throw invalid('document contains characters not allowed in XML');
  const valid = XMLValidator.validate(xml, { allowBooleanAttributes: false });
  if (valid !== true) {
    throw invalid(`malformed XML: ${valid.err.msg} (line ${valid.err.line}, column ${valid.err.col})`);
  }
  let parsed: RawNode[];
  try {
    parsed = parser.parse(xml) as RawNode[];
  } catch (e) {
    // e.g. the parser's nesting limit: still bad input, not an agent failure
    throw invalid(`malformed XML: ${(e as Error).message}`);
  }
  const top = convert(parsed);
  const roots = top.filter((c): c is XElement => c.kind === 'element');
  if (roots.length !== 1) throw invalid(`expected exactly one root element, found ${roots.length}`);
  if (top.some((c) => c.kind === 'text')) throw invalid('text outside the root element');
  return roots[0]!;
}

const escText = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/\r/g, '&#13;');
const escAttr = (s: string) =>
  escText(s).replace(/'/g, '&apos;').replace(/\n/g, '&#10;').replace(/\t/g, '&#9;');

function openTag(el: XElement): string {
  let s = `<${el.name}`;
  for (const [k, v] of el.attrs) s += ` ${k}='${escAttr(v)}'`;
  return s;
}

/** Mixed content is written inline so that no whitespace is invented inside it. */
function inline(child: XChild): string {
  if (child.kind === 'text') return escText(child.text);
  if (child.kind === 'comment') return `<!--${child.text}-->`;
  if (child.children.length === 0) return `${openTag(child)}/>`;
  return `${openTag(child)}>${child.children.map(inline).join('')}</${child.name}>`;
}

function block(el: XElement, indent: string): string {
  if (el.children.length === 0) return `${indent}${openTag(el)}/>\n`;
  if (el.children.some((c) => c.kind === 'text')) return `${indent}${inline(el)}\n`;
  let s = `${indent}${openTag(el)}>\n`;
  for (const c of el.children) {
    s += c.kind === 'element' ? block(c, indent + '  ') : `${indent}  ${inline(c)}\n`;
  }
  return `${s}${indent}</${el.name}>\n`;
}

/** Canonical text of a tree: two-space indentation, single-quoted attributes. */
export function serializeXmlTree(root: XElement): string {
  return block(root, '');
}

/** Canonical text of an element's children (used to keep `<metadata>` verbatim in the model). */
export function serializeChildren(el: XElement): string {
  if (el.children.some((c) => c.kind === 'text')) return el.children.map(inline).join('');
  return el.children.map((c) => (c.kind === 'element' ? block(c, '') : `${inline(c)}\n`)).join('');
}

/** The element children of `el`, only those named `name` when given. */
export function childElements(el: XElement, name?: string): XElement[] {
  return el.children.filter((c): c is XElement => c.kind === 'element' && (name === undefined || c.name === name));
}

export function element(name: string, attrs: [string, string][] = [], children: XChild[] = []): XElement {
  return { kind: 'element', name, attrs: new Map(attrs), children };
}
