/**
 * Parse + normalize of request XML (define, Prepare2) in worker threads: at the size caps a
 * crafted document takes 0.3 s (define, 256 KiB) to 0.6 s (Prepare2, 512 KiB) of CPU
 * (bench/xml-parse.ts), which on the event loop would stall every other request and every
 * migration's QMP polling. Bounded twice: each parse in time (400 xml_too_complex; its worker is
 * ended) and the documents waiting for a thread in number (503 xml_parser_busy).
 */
import os from 'node:os';
import { Piscina } from 'piscina';
import { AgentError, DomainXmlError } from '../errors.js';
import type { DomainDef, NormalizeHost } from '../domain/index.js';
import type { XmlAnswer, XmlTask } from './xml-worker.js';

export interface XmlPoolLimits {
  threads: number;
  /** Documents that may wait for a thread; one more is refused. */
  maxWaiting: number;
  /** One parse, from the moment it has a thread (a thread's start included: threads start when needed). */
  timeoutMs: number;
}

export const XML_POOL_DEFAULTS: XmlPoolLimits = {
  // One core stays for the event loop.
  threads: Math.max(1, Math.min(4, os.availableParallelism() - 1)),
  maxWaiting: 16,
  // Ten times the worst document measured, for a loaded host; real domain XML takes milliseconds.
  timeoutMs: 3000,
};

export class XmlPool {
  private readonly pool: Piscina<XmlTask, XmlAnswer>;
  private busy = 0;
  /** Callers waiting for a thread, first come first served; each is handed a finished one's. */
  private readonly waiting: Array<() => void> = [];

  constructor(private readonly limits: XmlPoolLimits = XML_POOL_DEFAULTS) {
    // No thread while idle: an agent that fails to start leaves none behind, and an idle one holds no memory for them.
    this.pool = new Piscina({ filename: new URL('./xml-worker.js', import.meta.url).href, minThreads: 0, maxThreads: limits.threads, idleTimeout: 60_000 });
  }

  async normalize(xml: string, host: Pick<NormalizeHost, 'machineAliases' | 'knownMachines' | 'firmwares'>): Promise<{ xml: string; def: DomainDef }> {
    if (this.busy < this.limits.threads) this.busy++;
    else if (this.waiting.length < this.limits.maxWaiting) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else {
      throw new AgentError(503, 'xml_parser_busy', `${this.busy} domain XML documents are being parsed and ${this.waiting.length} wait: send it again shortly`, { retryAfterSeconds: 1 });
    }
    let answer: XmlAnswer;
    try {
      answer = await this.pool.run({ xml, machineAliases: host.machineAliases, knownMachines: host.knownMachines, firmwares: host.firmwares }, { signal: AbortSignal.timeout(this.limits.timeoutMs) });
    } catch (err) {
      if ((err as Error).name === 'AbortError') {
        throw new DomainXmlError('xml_too_complex', '/', `parsing the domain XML took longer than ${this.limits.timeoutMs} ms: make it smaller or flatter (fewer elements, attributes, nesting)`);
      }
      throw err;
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.busy--;
    }
    if ('refused' in answer) throw DomainXmlError.of(answer.refused);
    return answer.normalized;
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}
