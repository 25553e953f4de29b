/**
 * Mutated fixtures (each element removed; each attribute removed, emptied or set to junk) must
 * either normalize and build, or be refused with a DomainXmlError: never crash with anything else.
 */
import t from 'tap';
import { DomainXmlError } from '../../src/errors.js';
import { buildArgv, domainFileRefs, normalizeDomainXml } from '../../src/domain/index.js';
import { parseXmlTree, serializeXmlTree, type XElement } from '../../src/domain/xml.js';
import { countingHost, fixtureNames, KVM_HOST, readFixture } from './helpers.js';

function* elements(el: XElement): Generator<XElement> {
  yield el;
  for (const c of el.children) if (c.kind === 'element') yield* elements(c);
}

/** Every variant of the document, produced by mutating a fresh copy of the tree. */
function* mutants(xml: string): Generator<string> {
  const count = [...elements(parseXmlTree(xml))].length;
  for (let i = 0; i < count; i++) {
    const target = [...elements(parseXmlTree(xml))][i]!;
    for (const name of [...target.attrs.keys()]) {
      for (const value of [undefined, '', 'x', '-1', '99999999999999999999', '0x1f']) {
        const root = parseXmlTree(xml);
        const el = [...elements(root)][i]!;
        if (value === undefined) el.attrs.delete(name);
        else el.attrs.set(name, value);
        yield serializeXmlTree(root);
      }
    }
    if (i > 0) {
      const root = parseXmlTree(xml);
      const all = [...elements(root)];
      const parent = all.find((p) => p.children.includes(all[i]!))!;
      parent.children.splice(parent.children.indexOf(all[i]!), 1);
      yield serializeXmlTree(root);
      const dup = parseXmlTree(xml);
      const dall = [...elements(dup)];
      const dparent = dall.find((p) => p.children.includes(dall[i]!))!;
      dparent.children.push(dall[i]!);
      yield serializeXmlTree(dup);
    }
  }
}

for (const name of fixtureNames()) {
  t.test(name, async (t) => {
    let accepted = 0;
    let refused = 0;
    const crashes: string[] = [];
    for (const xml of mutants(readFixture(`${name}.xml`))) {
      try {
        const { def } = normalizeDomainXml(xml, countingHost());
        buildArgv(def, KVM_HOST, { incoming: true });
        domainFileRefs(def);
        accepted++;
      } catch (e) {
        if (e instanceof DomainXmlError && e.element.startsWith('/')) refused++;
        else crashes.push(`${(e as Error).stack}\n${xml}`);
      }
    }
    t.same(crashes, [], 'nothing but DomainXmlError is thrown');
    t.ok(accepted > 0 && refused > 0, `${accepted} accepted, ${refused} refused`);
  });
}
