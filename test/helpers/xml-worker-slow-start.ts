// XmlPool's worker with a start-up of XML_WORKER_START_MS, blocking as a thread that loads its
// modules on a loaded host does: a start-up longer than a parse's time limit, on purpose.
import { isMainThread } from 'node:worker_threads';

export const XML_WORKER_START_MS = 1200;

// Only in the worker thread: the test reads the constant from its main thread.
if (!isMainThread) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, XML_WORKER_START_MS);

export { default } from '../../src/agent/xml-worker.js';
