/**
 * Benchmark (not a test): how long parse + normalize of request XML holds the event loop, for
 * the shapes of test/helpers/worst-xml.ts at the define cap and at Prepare2's (twice that).
 *
 *   node dist/bench/xml-parse.js [--rounds N]
 */
import { parseArgs } from 'node:util';
import { DomainXmlError } from '../src/errors.js';
import { normalizeDomainXml } from '../src/domain/index.js';
import { MAX_DOMAIN_XML_BYTES } from '../routes/domains.js';
import { median } from './harness.js';
import { WORST_SHAPES } from '../test/helpers/worst-xml.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '20' } } });
const rounds = Number(values.rounds);
const host = {
  machineAliases: { pc: 'pc-i440fx-7.2' },
  knownMachines: ['pc-i440fx-7.2'],
  firmwares: [],
  randomBytes: (n: number) => Buffer.alloc(n, 7),
};

/** One parse + normalize in ms, and whether the XML was accepted or which code refused it. */
function once(xml: string): { ms: number; outcome: string } {
  const started = process.hrtime.bigint();
  let outcome = 'accepted';
  try {
    normalizeDomainXml(xml, host);
  } catch (err) {
    if (!(err instanceof DomainXmlError)) throw err;
    outcome = `refused (${err.code})`;
  }
  return { ms: Number(process.hrtime.bigint() - started) / 1e6, outcome };
}

let worst = 0;
for (const [label, bytes] of [['define', MAX_DOMAIN_XML_BYTES], ['Prepare2', 2 * MAX_DOMAIN_XML_BYTES]] as const) {
  for (const [shape, make] of Object.entries(WORST_SHAPES)) {
    const xml = make(bytes);
    once(xml); // warm-up: the first run also compiles
    const runs = Array.from({ length: rounds }, () => once(xml));
    const ms = runs.map((r) => r.ms);
    worst = Math.max(worst, ...ms);
    console.log(`${label.padEnd(8)} ${shape.padEnd(17)} ${(Buffer.byteLength(xml) / 1024).toFixed(0).padStart(4)} KiB  median ${median(ms).toFixed(1).padStart(7)} ms  max ${Math.max(...ms).toFixed(1).padStart(7)} ms  ${runs[0]!.outcome}`);
  }
}
console.log(`longest single parse: ${worst.toFixed(1)} ms`);
