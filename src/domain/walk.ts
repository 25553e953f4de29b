/**
 * Strict walk over the XML tree: each element declares the attributes and children it knows,
 * and anything else is a DomainXmlError naming the element (XPath-like, `disk[2]/driver/@cache`).
 */
import { DomainXmlError } from '../errors.js';
import { childElements, type XElement } from './xml.js';

export const fail = (code: string, element: string, message: string) => new DomainXmlError(code, element, message);

/**
 * Gathers the blockers of one document: a part that fails is recorded and the walk goes on with
 * the next, so one answer names everything a user must change (a virt-install XML has many).
 */
export class Blockers {
  private readonly found: DomainXmlError[] = [];

  add(err: DomainXmlError): void {
    this.found.push(err);
  }

  /** Runs one independent part; on a refusal, records it and answers undefined. */
  attempt<T>(part: () => T): T | undefined {
    try {
      return part();
    } catch (err) {
      if (!(err instanceof DomainXmlError)) throw err;
      this.add(err);
      return undefined;
    }
  }

  get any(): boolean {
    return this.found.length > 0;
  }

  /** Throws every blocker recorded, in document order, as one error. */
  throwIfAny(): void {
    if (this.found.length > 0) throw DomainXmlError.of(this.found.flatMap((e) => e.errors));
  }
}

/** Namespace declarations are inert; they are allowed wherever attributes are checked. */
const isNamespaceDecl = (name: string) => name === 'xmlns' || name.startsWith('xmlns:');

export interface Shape {
  attrs?: readonly string[];
  children?: readonly string[];
  /** Children that may repeat: their paths always carry an index (`boot[1]`). */
  repeated?: readonly string[];
  /** Every child gets an index (the children of `<devices>`, except `except`). */
  indexAll?: { except: readonly string[] };
  text?: boolean;
}

export class Node {
  /** With `blockers`, what `expect` refuses is recorded there and the walk goes on. */
  constructor(readonly el: XElement, readonly path: string, private shape: Shape = {}, readonly blockers?: Blockers) {}

  private refuse(err: DomainXmlError): void {
    if (!this.blockers) throw err;
    this.blockers.add(err);
  }

  get name(): string {
    return this.el.name;
  }

  attrPath(name: string): string {
    return `${this.path}/@${name}`;
  }

  /** Declares what this element may contain and refuses everything else. */
  expect(shape: Shape): this {
    this.shape = shape;
    const attrs = shape.attrs ?? [];
    for (const name of this.el.attrs.keys()) {
      if (!attrs.includes(name) && !isNamespaceDecl(name)) {
        this.refuse(fail('unsupported_attribute', this.attrPath(name), `attribute '${name}' of <${this.name}> is not supported`));
      }
    }
    const known = shape.children ?? [];
    const counts = new Map<string, number>();
    for (const child of this.el.children) {
      if (child.kind === 'text' && !shape.text) {
        this.refuse(fail('invalid_value', this.path, `<${this.name}> must not contain text`));
        continue;
      }
      if (child.kind !== 'element') continue;
      const n = (counts.get(child.name) ?? 0) + 1;
      counts.set(child.name, n);
      const path = this.childPath(child.name, n);
      if (!known.includes(child.name)) {
        if (child.name === 'qemu:commandline' || child.name.endsWith(':commandline')) {
          this.refuse(fail('unsupported_element', path, 'raw qemu command-line passthrough is not allowed'));
        } else {
          this.refuse(fail('unsupported_element', path, `element <${child.name}> is not supported here`));
        }
      } else if (n > 1 && !this.isRepeated(child.name)) {
        this.refuse(fail('duplicate_element', `${this.path}/${child.name}[${n}]`, `element <${child.name}> may appear only once`));
      }
    }
    return this;
  }

  private isRepeated(name: string): boolean {
    const s = this.shape;
    return (s.repeated ?? []).includes(name) || (s.indexAll !== undefined && !s.indexAll.except.includes(name));
  }

  private childPath(name: string, n: number): string {
    return this.isRepeated(name) ? `${this.path}/${name}[${n}]` : `${this.path}/${name}`;
  }

  child(name: string): Node | undefined {
    const [el] = childElements(this.el, name);
    return el ? new Node(el, this.childPath(name, 1), {}, this.blockers) : undefined;
  }

  requireChild(name: string): Node {
    const c = this.child(name);
    if (!c) throw fail('missing_element', `${this.path}/${name}`, `<${this.name}> needs a <${name}> element`);
    return c;
  }

  children(name: string): Node[] {
    return childElements(this.el, name).map((el, i) => new Node(el, this.childPath(name, i + 1), {}, this.blockers));
  }

  /** All element children in document order (for `<devices>`). */
  elements(): Node[] {
    const counts = new Map<string, number>();
    return childElements(this.el).map((el) => {
      const n = (counts.get(el.name) ?? 0) + 1;
      counts.set(el.name, n);
      return new Node(el, this.childPath(el.name, n), {}, this.blockers);
    });
  }

  attr(name: string): string | undefined {
    return this.el.attrs.get(name);
  }

  requireAttr(name: string): string {
    const v = this.attr(name);
    if (v === undefined) throw fail('missing_attribute', this.attrPath(name), `<${this.name}> needs attribute '${name}'`);
    return v;
  }

  enumAttr<T extends string>(name: string, values: readonly T[]): T | undefined {
    const v = this.attr(name);
    if (v === undefined) return undefined;
    if (!(values as readonly string[]).includes(v)) {
      throw fail('unsupported_value', this.attrPath(name), `${name}='${v}' is not supported (supported: ${values.join(', ')})`);
    }
    return v as T;
  }

  requireEnumAttr<T extends string>(name: string, values: readonly T[]): T {
    this.requireAttr(name);
    return this.enumAttr(name, values)!;
  }

  /** Decimal, or hex with 0x (libvirt accepts both for addresses). */
  intAttr(name: string, min: number, max: number): number | undefined {
    const v = this.attr(name);
    if (v === undefined) return undefined;
    const n = parseUnsigned(v);
    if (n === undefined || n < min || n > max) {
      throw fail('invalid_value', this.attrPath(name), `${name}='${v}' must be an integer in ${min}..${max}`);
    }
    return n;
  }

  requireIntAttr(name: string, min: number, max: number): number {
    this.requireAttr(name);
    return this.intAttr(name, min, max)!;
  }

  boolAttr(name: string, yes: string, no: string): boolean | undefined {
    const v = this.enumAttr(name, [yes, no]);
    return v === undefined ? undefined : v === yes;
  }

  text(): string {
    return this.el.children.map((c) => (c.kind === 'text' ? c.text : '')).join('').trim();
  }

  requireText(): string {
    const t = this.text();
    if (t === '') throw fail('invalid_value', this.path, `<${this.name}> must not be empty`);
    return t;
  }
}

function parseUnsigned(v: string): number | undefined {
  if (/^[0-9]{1,15}$/.test(v)) return Number(v);
  if (/^0x[0-9a-fA-F]{1,12}$/.test(v)) return parseInt(v.slice(2), 16);
  return undefined;
}
