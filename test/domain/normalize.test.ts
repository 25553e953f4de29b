import t from 'tap';
import { normalizeDomainXml, parseDomainXml, type NormalizeHost } from '../../src/domain/index.js';
import { countingHost, domainXml, fixtureNames, NIC, readFixture, refusal, UUID, VDA } from './helpers.js';

const MINIMAL = readFixture('minimal.xml');
const noUuidHead = "<name>t1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>";

t.test('alias machine types are resolved and written back', async (t) => {
  const pc = normalizeDomainXml(MINIMAL, countingHost());
  t.match(pc.xml, "<type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>");
  t.equal(pc.def.machine, 'pc-i440fx-7.2');
  const q35 = normalizeDomainXml(domainXml({ os: "<os><type arch='x86_64' machine='q35'>hvm</type></os>" }), countingHost());
  t.equal(q35.def.machine, 'pc-q35-7.2');
  t.equal(q35.def.machineFamily, 'q35');
  t.match(q35.xml, "machine='pc-q35-7.2'");
});

t.test('a missing machine type means the pc alias', async (t) => {
  const n = normalizeDomainXml(domainXml({ os: '<os><type>hvm</type></os>' }), countingHost());
  t.equal(n.def.machine, 'pc-i440fx-7.2');
  t.match(n.xml, "<type machine='pc-i440fx-7.2'>hvm</type>");
});

t.test('a versioned machine type is kept', async (t) => {
  const n = normalizeDomainXml(domainXml({ os: "<os><type machine='pc-i440fx-6.2'>hvm</type></os>" }), countingHost());
  t.equal(n.def.machine, 'pc-i440fx-6.2');
});

t.test('machine types the host does not know are refused', async (t) => {
  const old = refusal(() => normalizeDomainXml(domainXml({ os: "<os><type machine='pc-i440fx-2.0'>hvm</type></os>" }), countingHost()));
  t.match(old, { code: 'unsupported_value', element: '/domain/os/type/@machine' });
  const noAlias: NormalizeHost = { ...countingHost(), machineAliases: {} };
  t.match(refusal(() => normalizeDomainXml(MINIMAL, noAlias)), { code: 'unsupported_value', element: '/domain/os/type/@machine' });
  const crossed: NormalizeHost = { ...countingHost(), machineAliases: { pc: 'pc-q35-7.2' } };
  t.match(refusal(() => normalizeDomainXml(MINIMAL, crossed)), { code: 'unsupported_value', element: '/domain/os/type/@machine' });
});

t.test('a missing uuid is generated (v4) and written after the name', async (t) => {
  const n = normalizeDomainXml(domainXml({ head: noUuidHead }), countingHost());
  t.match(n.def.uuid, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  t.match(n.xml, `<name>t1</name>\n  <uuid>${n.def.uuid}</uuid>\n`);
  const again = normalizeDomainXml(domainXml({ head: noUuidHead }), countingHost());
  t.equal(again.def.uuid, n.def.uuid, 'the same random bytes give the same uuid');
  let calls = 0;
  const other = normalizeDomainXml(domainXml({ head: noUuidHead }), { ...countingHost(), randomBytes: (k) => Buffer.alloc(k, 0x80 + ++calls) });
  t.not(other.def.uuid, n.def.uuid);
});

t.test('a given uuid is kept as written', async (t) => {
  const upper = UUID.toUpperCase().replace(/-/g, '');
  const n = normalizeDomainXml(domainXml({ head: `<name>t1</name><uuid>${upper}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>` }), countingHost());
  t.match(n.xml, `<uuid>${upper}</uuid>`);
  t.equal(n.def.uuid, UUID);
});

t.test('MAC addresses are generated for interfaces without one', async (t) => {
  const xml = domainXml({ devices: "<interface type='user'><model type='virtio'/></interface><interface type='user'/>" });
  const n = normalizeDomainXml(xml, countingHost());
  t.same(n.def.interfaces.map((i) => i.mac), ['52:54:00:01:01:01', '52:54:00:02:02:02']);
  t.match(n.xml, "<interface type='user'>\n      <mac address='52:54:00:01:01:01'/>\n      <model type='virtio'/>");
  t.match(n.xml, "<mac address='52:54:00:02:02:02'/>\n      <model type='rtl8139'/>", 'the default NIC model is written too');
  t.same(normalizeDomainXml(xml, countingHost()).def.interfaces.map((i) => i.mac), n.def.interfaces.map((i) => i.mac), 'stable');
  for (const m of n.def.interfaces.map((i) => i.mac)) t.match(m, /^52:54:00(:[0-9a-f]{2}){3}$/);
});

t.test('generated MACs avoid the ones in use', async (t) => {
  const xml = domainXml({ devices: NIC('52:54:00:01:01:01') + "<interface type='user'/>" });
  const n = normalizeDomainXml(xml, countingHost());
  t.same(n.def.interfaces.map((i) => i.mac), ['52:54:00:01:01:01', '52:54:00:02:02:02']);
  const stuck: NormalizeHost = { ...countingHost(), randomBytes: (k) => Buffer.alloc(k, 1) };
  t.throws(() => normalizeDomainXml(xml, stuck), /already in use/);
});

t.test('implicit controllers, defaults and addresses are written back', async (t) => {
  const n = normalizeDomainXml(domainXml({ devices: `${VDA}<input type='tablet'/><disk type='file' device='cdrom'><target dev='sdb'/></disk>` }), countingHost());
  t.match(n.xml, "<target dev='vda' bus='virtio'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>");
  t.match(n.xml, "<input type='tablet'>\n      <address type='usb' bus='0' port='1'/>");
  t.match(n.xml, "<target dev='sdb' bus='scsi'/>\n      <address type='drive' controller='0' bus='0' target='0' unit='1'/>");
  t.match(n.xml, "<controller type='usb' index='0' model='piix3-uhci'>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>");
  t.match(n.xml, "<controller type='scsi' index='0' model='virtio-scsi'>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>");
  const g = normalizeDomainXml(domainXml({ devices: "<graphics type='vnc'/>" }), countingHost());
  t.match(g.xml, "<video>\n      <model type='vga' vram='16384' heads='1' primary='yes'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>");
  const c = normalizeDomainXml(domainXml({ devices: "<controller type='usb'/><controller type='virtio-serial'/><serial type='pty'/>" }), countingHost());
  t.match(c.xml, "<controller type='usb' index='0' model='piix3-uhci'>");
  t.match(c.xml, "<controller type='virtio-serial' index='0'>");
  t.match(c.xml, "<serial type='pty'>\n      <target port='0'/>");
});

t.test('written-back addresses keep devices in place when the domain is edited', async (t) => {
  const n = normalizeDomainXml(domainXml({ devices: NIC('52:54:00:00:00:01') + NIC('52:54:00:00:00:02') }), countingHost());
  const slots = n.def.interfaces.map((i) => i.address.slot);
  t.same(slots, [2, 3]);
  const edited = n.xml.replace('<devices>', `<devices>${NIC('52:54:00:00:00:03')}`);
  const def = parseDomainXml(edited);
  t.same(def.interfaces.map((i) => i.address.slot), [4, 2, 3], 'the old NICs did not move; the new one got a free slot');
  const fresh = parseDomainXml(domainXml({ devices: NIC('52:54:00:00:00:03') + NIC('52:54:00:00:00:01') + NIC('52:54:00:00:00:02') }));
  t.same(fresh.interfaces.map((i) => i.address.slot), [2, 3, 4], 'without write-back they would have moved');
});

t.test('normalization is idempotent for every fixture', async (t) => {
  for (const name of fixtureNames()) {
    const once = normalizeDomainXml(readFixture(`${name}.xml`), countingHost());
    let calls = 0;
    const otherRandom: NormalizeHost = { ...countingHost(), randomBytes: (k) => Buffer.alloc(k, 0xa0 + ++calls) };
    const twice = normalizeDomainXml(once.xml, otherRandom);
    t.equal(twice.xml, once.xml, `${name}: same XML`);
    t.same(twice.def, once.def, `${name}: same model`);
    t.same(parseDomainXml(once.xml), once.def, `${name}: the returned model is the stored XML's`);
  }
});

t.test('everything the user wrote is kept', async (t) => {
  const xml = `<?xml version='1.0'?>
<!-- top comment -->
<domain type='kvm' xmlns:my='urn:example'>
  <name>keep</name>
  <title>A &lt;title&gt; &amp; more</title>
  <description>multi
line &quot;text&quot; with 'quotes'</description>
  <metadata>
    <my:data xmlns:my='urn:example' a='1 &lt; 2' b="it's">
      text <my:b>bold</my:b> tail
      <!-- inner comment -->
      <my:empty/>
    </my:data>
    <other:x xmlns:other='urn:other'><![CDATA[<raw> & stuff]]></other:x>
  </metadata>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type></os>
  <devices>
    <!-- the boot disk -->
    ${VDA}
  </devices>
</domain>`;
  const n = normalizeDomainXml(xml, countingHost());
  t.equal(n.def.title, 'A <title> & more');
  t.equal(n.def.description, `multi\nline "text" with 'quotes'`);
  t.match(n.xml, "<domain type='kvm' xmlns:my='urn:example'>");
  t.match(n.xml, "<my:data xmlns:my='urn:example' a='1 &lt; 2' b='it&apos;s'>");
  t.match(n.xml, '<my:b>bold</my:b>');
  t.match(n.xml, '<!-- inner comment -->');
  t.match(n.xml, '<!-- the boot disk -->');
  t.match(n.xml, '<other:x xmlns:other=\'urn:other\'>&lt;raw&gt; &amp; stuff</other:x>');
  t.match(n.def.metadata, '<my:empty/>');
  const again = parseDomainXml(n.xml);
  t.equal(again.title, n.def.title);
  t.equal(again.description, n.def.description);
  t.equal(again.metadata, n.def.metadata);
});

t.test('normalization refuses what parsing refuses', async (t) => {
  t.match(refusal(() => normalizeDomainXml(domainXml({ devices: '<hostdev/>' }), countingHost())), { code: 'unsupported_element', element: '/domain/devices/hostdev[1]' });
  t.match(refusal(() => normalizeDomainXml('<!DOCTYPE x><domain/>', countingHost())), { code: 'invalid_xml' });
});
