/**
 * Parse + normalize of request XML (define, Prepare2) in worker threads: at the size caps a
 * crafted document takes 0.3 s (define, 256 KiB) to 0.6 s (Prepare2, 512 KiB) of CPU
 * (bench/xml-parse.ts), which on the event loop would stall every other request and every
 * migration's QMP polling. Bounded twice: each parse in time (400 xml_too_complex; its worker is
 * ended) and the documents waiting for a thread in number (503 xml_parser_busy).
 *
 * A parse's time starts when a ready worker has the document: threads start when needed (after
 * a parse past its time ended one, the next document waits for a fresh thread to load its
 * modules), and on a loaded host that start-up alone may exceed the parse's limit. The start-up
 * is bounded on its own (503 xml_parser_not_ready): a worker that never becomes ready does not
 * hold a request for ever.
 */
import os from 'node:os';
import { MessageChannel } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { AgentError, DomainXmlError } from '../errors.js';
import type { DomainDef, NormalizeHost } from '../domain/index.js';
import type { XmlAnswer, XmlTask } from './xml-worker.js';

export interface XmlPoolLimits {
  threads: number;
  /** Documents that may wait for a thread; one more is refused. */
  maxWaiting: number;
  /** One parse, from the moment a ready worker has the document (a thread's start-up not included). */
  timeoutMs: number;
  /** From the moment a document has a thread until a worker has it: the thread's start (its modules loaded) when it is a fresh one. */
  startTimeoutMs: number;
}

export const XML_POOL_DEFAULTS: XmlPoolLimits = {
  // One core stays for the event loop.
  threads: Math.max(1, Math.min(4, os.availableParallelism() - 1)),
  maxWaiting: 16,
  // Ten times the worst document measured, for a loaded host; real domain XML takes milliseconds.
  timeoutMs: 3000,
  // A thread loads its modules in ~0.1 s; seconds under load. Beyond this it is not coming.
  startTimeoutMs: 10_000,
};

/** The worker thread's module; tests give one whose start-up is slow or never ends. */
const XML_WORKER = new URL('./xml-worker.js', import.meta.url);

export class XmlPool {
  private readonly pool: Piscina<XmlTask, XmlAnswer>;
  private busy = 0;
  /** Callers waiting for a thread, first come first served; each is handed a finished one's. */
  private readonly waiting: Array<() => void> = [];

  constructor(
    private readonly limits: XmlPoolLimits = XML_POOL_DEFAULTS,
    worker: URL = XML_WORKER,
  ) {
    // No thread while idle: an agent that fails to start leaves none behind, and an idle one holds no memory for them.
    this.pool = new Piscina({ filename: worker.href, minThreads: 0, maxThreads: limits.threads, idleTimeout: 60_000 });
  }

  async normalize(xml: string, host: Pick<NormalizeHost, 'machineAliases' | 'knownMachines' | 'firmwares'>): Promise<{ xml: string; def: DomainDef }> {
    if (this.busy < this.limits.threads) this.busy++;
    else if (this.waiting.length < this.limits.maxWaiting) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else {
      throw new AgentError(503, 'xml_parser_busy', `${this.busy} domain XML documents are being parsed and ${this.waiting.length} wait: send it again shortly`, { retryAfterSeconds: 1 });
    }
    // Two bounds in turn on one signal: the start-up's until the worker says it has the
    // document (on `started`), then the parse's. Piscina hands a document only to a ready
    // worker, so the message comes after the thread's start, at the parse's beginning.
    const abort = new AbortController();
    const started = new MessageChannel();
    let parsing = false;
    let timer = setTimeout(() => abort.abort(), this.limits.startTimeoutMs);
    started.port1.once('message', () => {
      clearTimeout(timer);
      parsing = true;
      timer = setTimeout(() => abort.abort(), this.limits.timeoutMs);
    });
    let answer: XmlAnswer;
    try {
      const task: XmlTask = { xml, machineAliases: host.machineAliases, knownMachines: host.knownMachines, firmwares: host.firmwares, started: started.port2 };
      answer = await this.pool.run(task, { signal: abort.signal, transferList: [started.port2] });
    } catch (err) {
      if ((err as Error).name === 'AbortError' && abort.signal.aborted) {
        if (parsing) {
          throw new DomainXmlError('xml_too_complex', '/', `parsing the domain XML took longer than ${this.limits.timeoutMs} ms: make it smaller or flatter (fewer elements, attributes, nesting)`);
        }
        throw new AgentError(503, 'xml_parser_not_ready', `no XML parser thread was ready within ${this.limits.startTimeoutMs} ms (the host is loaded): send it again shortly`, { retryAfterSeconds: 1 });
      }
      throw err;
    } finally {
      clearTimeout(timer);
      started.port1.close();
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
