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
import { WARM_UP_XML } from '../src/agent/xml-warm-up.js';

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

// A common guest, first in this fresh process (the parser's code not compiled yet), then warm:
// what XmlPool's thread warm-up (src/agent/xml-warm-up.ts) spares a define or Prepare2.
{
  const cold = once(WARM_UP_XML).ms;
  const warm = Array.from({ length: 60 }, () => once(WARM_UP_XML).ms);
  console.log(`common guest (${(Buffer.byteLength(WARM_UP_XML) / 1024).toFixed(1)} KiB): first parse ${cold.toFixed(1)} ms, parses 2-61 median ${median(warm.slice(0, 10)).toFixed(1)} ms for the first ten, ${median(warm.slice(-10)).toFixed(1)} ms for the last ten`);
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
