import t from 'tap';
import { normalizeDomainXml, parseDomainXml } from '../../src/domain/index.js';
import { countingHost, domainXml, refusal, UUID, VDA } from './helpers.js';

t.test('DOCTYPE and entity declarations are refused before parsing', async (t) => {
  const laughs = `<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><domain type='kvm'><name>&lol2;</name></domain>`;
  for (const xml of [laughs, `<!doctype domain>${domainXml()}`, `${domainXml()}<!ENTITY x "y">`, `<!DOCTYPE domain SYSTEM "file:///etc/passwd">${domainXml()}`]) {
    t.match(refusal(() => parseDomainXml(xml)), { code: 'invalid_xml', element: '/' }, xml.slice(0, 40));
  }
});

t.test('predefined entities and character references are decoded', async (t) => {
  const def = parseDomainXml(domainXml({
    head: `<name>t1</name><uuid>${UUID}</uuid><title>&lt;&gt;&amp;&quot;&apos;&#65;&#x42;</title><memory unit='MiB'>64</memory><vcpu>1</vcpu>`,
    devices: "<disk type='file' device='disk'><source file='/v/a&amp;b&#x2c;c.img'/><target dev='vda'/></disk>",
  }));
  t.equal(def.title, `<>&"'AB`);
  t.equal(def.disks[0]!.source, '/v/a&b,c.img');
});

t.test('CDATA is literal text', async (t) => {
  const def = parseDomainXml(domainXml({ head: `<name>t1</name><uuid>${UUID}</uuid><description><![CDATA[a &amp; <b>]]></description><memory unit='MiB'>64</memory><vcpu>1</vcpu>` }));
  t.equal(def.description, 'a &amp; <b>');
  const n = normalizeDomainXml(domainXml({ head: `<name>t1</name><description><![CDATA[a &amp; <b>]]></description><memory unit='MiB'>64</memory><vcpu>1</vcpu>` }), countingHost());
  t.equal(parseDomainXml(n.xml).description, 'a &amp; <b>');
});

t.test('comments, processing instructions and the declaration are ignored', async (t) => {
  const xml = `<?xml version="1.0" encoding="UTF-8"?><?some-pi data?><domain type='kvm'><!-- c --><name>t1</name><uuid>${UUID}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><!-- c --><type machine='pc'>hvm</type></os><devices><!-- c -->${VDA.replace('<target', '<!-- c --><target')}</devices></domain>`;
  t.equal(parseDomainXml(xml).disks.length, 1);
});

t.test('attribute values with newlines, tabs and quotes survive normalization', async (t) => {
  const n = normalizeDomainXml(domainXml({ head: `<name>t1</name><uuid>${UUID}</uuid><metadata><x:a xmlns:x='urn:x' v="l1&#10;l2&#9;&quot;q&quot; 'a'"/></metadata><memory unit='MiB'>64</memory><vcpu>1</vcpu>` }), countingHost());
  t.match(n.xml, `v='l1&#10;l2&#9;"q" &apos;a&apos;'`);
  t.equal(normalizeDomainXml(n.xml, countingHost()).xml, n.xml);
});

t.test('absurd nesting is refused as bad XML', async (t) => {
  const deep = `<domain type='kvm'><name>t</name><metadata>${'<a>'.repeat(5000)}${'</a>'.repeat(5000)}</metadata></domain>`;
  t.match(refusal(() => parseDomainXml(deep)), { code: 'invalid_xml', element: '/' });
});

t.test('the root element and the document shape', async (t) => {
  t.match(refusal(() => parseDomainXml('<domain type="kvm">')), { code: 'invalid_xml' });
  t.match(refusal(() => parseDomainXml(`${domainXml()}trailing`)), { code: 'invalid_xml' });
  t.match(refusal(() => parseDomainXml("<domain type='kvm' type='qemu'/>")), { code: 'invalid_xml' });
  t.match(refusal(() => parseDomainXml("<domain type=kvm/>")), { code: 'invalid_xml' });
  t.match(refusal(() => parseDomainXml("<domain type='kvm' flag/>")), { code: 'invalid_xml' });
});
