/** A worker thread of XmlPool: parse + normalize of one request's domain XML, off the event loop. */
import { randomBytes } from 'node:crypto';
import type { MessagePort } from 'node:worker_threads';
import { DomainXmlError, type XmlBlocker } from '../errors.js';
import { normalizeDomainXml, type DomainDef, type FirmwareDescriptor } from '../domain/index.js';

export interface XmlTask {
  xml: string;
  machineAliases: Record<string, string>;
  knownMachines: string[];
  firmwares: FirmwareDescriptor[];
  /** Told as the parse begins: XmlPool's time limit for the parse starts there, after this thread's start-up. */
  started: MessagePort;
}

export type XmlAnswer = { normalized: { xml: string; def: DomainDef } } | { refused: XmlBlocker[] };

export default function normalizeInWorker(task: XmlTask): XmlAnswer {
  task.started.postMessage(null);
  try {
    return { normalized: normalizeDomainXml(task.xml, { machineAliases: task.machineAliases, knownMachines: task.knownMachines, firmwares: task.firmwares, randomBytes }) };
  } catch (err) {
    // A class does not cross threads: its fields do, and XmlPool makes the refusal again.
    if (err instanceof DomainXmlError) return { refused: err.errors };
    throw err;
  }
}
