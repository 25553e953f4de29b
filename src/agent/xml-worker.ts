/** A worker thread of XmlPool: parse + normalize of one request's domain XML, off the event loop. */
import { randomBytes } from 'node:crypto';
import { DomainXmlError, type XmlBlocker } from '../errors.js';
import { normalizeDomainXml, type DomainDef, type FirmwareDescriptor } from '../domain/index.js';

export interface XmlTask {
  xml: string;
  machineAliases: Record<string, string>;
  knownMachines: string[];
  firmwares: FirmwareDescriptor[];
}

export type XmlAnswer = { normalized: { xml: string; def: DomainDef } } | { refused: XmlBlocker[] };

export default function normalizeInWorker(task: XmlTask): XmlAnswer {
  try {
    return { normalized: normalizeDomainXml(task.xml, { machineAliases: task.machineAliases, knownMachines: task.knownMachines, firmwares: task.firmwares, randomBytes }) };
  } catch (err) {
    // A class does not cross threads: its fields do, and XmlPool makes the refusal again.
    if (err instanceof DomainXmlError) return { refused: err.errors };
    throw err;
  }
}
