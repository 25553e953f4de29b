import { buildAgent } from './app.js';
import { DEFAULTS } from '../config.js';

/** The OpenAPI document as served at /documentation/json, rendered stably for committing. */
export async function openapiDocument(scratchStateDir: string): Promise<string> {
  const app = await buildAgent({
    // Never listens: the document only needs a valid configuration.
    token: 'openapi-document',
    listenHost: '127.0.0.1',
    listenPort: 0,
    stateDir: scratchStateDir,
    migrationAddress: '127.0.0.1',
    migrationPorts: { low: 49152, high: 49215 },
    allowPaths: [scratchStateDir],
    accel: 'tcg',
    incomingTimeoutSeconds: DEFAULTS.incomingTimeoutSeconds,
    bodyLimitBytes: DEFAULTS.bodyLimitBytes,
    requestTimeoutMs: DEFAULTS.requestTimeoutMs,
    allowedHosts: [],
    peers: [],
    maxDomains: DEFAULTS.maxDomains,
    maxLogBytes: DEFAULTS.maxLogBytes,
    maxIncoming: DEFAULTS.maxIncoming,
    maxOutgoing: DEFAULTS.maxOutgoing,
    jobHistory: DEFAULTS.jobHistory,
    qemuUser: 'root',
    qemuUids: DEFAULTS.qemuUids,
  });
  try {
    await app.ready();
    return JSON.stringify(app.swagger(), null, 2) + '\n';
  } finally {
    await app.close();
  }
}
