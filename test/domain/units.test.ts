import t from 'tap';
import { bytesToKiBCeil, kibRoundUpToMiB, parseDomainXml, scaledToBytes, unitToBytes } from '../../src/domain/index.js';
import { domainXml, refusal, UUID } from './helpers.js';

const K = 1024n;
const UNITS: [string, bigint][] = [
  ['b', 1n], ['bytes', 1n],
  ['KB', 1000n], ['k', K], ['KiB', K],
  ['MB', 1000n ** 2n], ['M', K ** 2n], ['MiB', K ** 2n],
  ['GB', 1000n ** 3n], ['G', K ** 3n], ['GiB', K ** 3n],
  ['TB', 1000n ** 4n], ['T', K ** 4n], ['TiB', K ** 4n],
  ['PB', 1000n ** 5n], ['P', K ** 5n], ['PiB', K ** 5n],
  ['EB', 1000n ** 6n], ['E', K ** 6n], ['EiB', K ** 6n],
];

t.test('every libvirt unit', async (t) => {
  for (const [unit, bytes] of UNITS) {
    t.equal(unitToBytes(unit), bytes, unit);
    t.equal(scaledToBytes('3', unit), 3n * bytes, `3 ${unit}`);
  }
});

t.test('units are case-insensitive as in libvirt', async (t) => {
  t.equal(unitToBytes('kib'), K);
  t.equal(unitToBytes('Kb'), 1000n);
  t.equal(unitToBytes('m'), K ** 2n);
  t.equal(unitToBytes('BYTES'), 1n);
});

t.test('unknown units and bad numbers are refused', async (t) => {
  for (const unit of ['', 'KiBs', 'XB', 'Ki', 'kibibytes', 'iB', 'byte s']) t.throws(() => unitToBytes(unit), RangeError, unit);
  for (const value of ['', '-1', '1.5', '1e3', ' 1', '0x10', 'ten']) t.throws(() => scaledToBytes(value, 'KiB'), RangeError, value);
});

t.test('the default unit is KiB', async (t) => {
  t.equal(scaledToBytes('2', undefined), 2048n);
});

t.test('rounding', async (t) => {
  t.equal(bytesToKiBCeil(0n), 0n);
  t.equal(bytesToKiBCeil(1n), 1n);
  t.equal(bytesToKiBCeil(1024n), 1n);
  t.equal(bytesToKiBCeil(1025n), 2n);
  t.equal(kibRoundUpToMiB(65536), 65536);
  t.equal(kibRoundUpToMiB(65537), 66560);
  t.equal(kibRoundUpToMiB(1), 1024);
});

const withMemory = (memory: string, current = '') =>
  domainXml({ head: `<name>t1</name><uuid>${UUID}</uuid>${memory}${current}<vcpu>1</vcpu>` });

t.test('memory in every unit reaches the model in KiB', async (t) => {
  const cases: [string, number][] = [
    ["<memory unit='b'>67108864</memory>", 65536],
    ["<memory unit='bytes'>67108865</memory>", 65537],
    ["<memory unit='KB'>536870</memory>", 524288],
    ["<memory unit='k'>65536</memory>", 65536],
    ["<memory unit='KiB'>65536</memory>", 65536],
    ["<memory>65536</memory>", 65536],
    ["<memory unit='MB'>100</memory>", 97657],
    ["<memory unit='M'>64</memory>", 65536],
    ["<memory unit='MiB'>64</memory>", 65536],
    ["<memory unit='GB'>1</memory>", 976563],
    ["<memory unit='G'>1</memory>", 1048576],
    ["<memory unit='GiB'>4</memory>", 4194304],
    ["<memory unit='TB'>1</memory>", 976562500],
    ["<memory unit='T'>1</memory>", 1073741824],
    ["<memory unit='TiB'>4</memory>", 4294967296],
  ];
  for (const [xml, kib] of cases) t.equal(parseDomainXml(withMemory(xml)).memoryKiB, kib, xml);
});

t.test('memory bounds: 16 MiB .. 4 TiB', async (t) => {
  t.equal(parseDomainXml(withMemory("<memory unit='MiB'>16</memory>")).memoryKiB, 16384);
  const tooSmall = refusal(() => parseDomainXml(withMemory("<memory unit='KiB'>16383</memory>")));
  t.match(tooSmall, { code: 'invalid_value', element: '/domain/memory' });
  for (const big of ["<memory unit='TiB'>5</memory>", "<memory unit='b'>4398046511105</memory>", "<memory unit='PiB'>1</memory>",
    "<memory unit='EiB'>1</memory>", "<memory unit='EB'>16</memory>", "<memory unit='EiB'>99999999999999999999</memory>"]) {
    t.match(refusal(() => parseDomainXml(withMemory(big))), { code: 'invalid_value', element: '/domain/memory' }, big);
  }
  t.match(refusal(() => parseDomainXml(withMemory("<memory unit='parsec'>1</memory>"))), { code: 'invalid_value', element: '/domain/memory' });
  t.match(refusal(() => parseDomainXml(withMemory("<memory unit='MiB'>1.5</memory>"))), { code: 'invalid_value', element: '/domain/memory' });
});

t.test('currentMemory defaults to memory and may not exceed it', async (t) => {
  const def = parseDomainXml(withMemory("<memory unit='MiB'>128</memory>"));
  t.equal(def.currentMemoryKiB, 131072);
  const lower = parseDomainXml(withMemory("<memory unit='MiB'>128</memory>", "<currentMemory unit='MiB'>64</currentMemory>"));
  t.equal(lower.currentMemoryKiB, 65536);
  t.match(refusal(() => parseDomainXml(withMemory("<memory unit='MiB'>64</memory>", "<currentMemory unit='MiB'>65</currentMemory>"))),
    { code: 'invalid_value', element: '/domain/currentMemory' });
});
