import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openapiDocument } from '../src/agent/openapi.js';
import { packageRoot } from '../src/agent/package-root.js';

// Regenerates openapi/openapi.json from the routes' schemas (npm run openapi).
const scratch = await fs.mkdtemp(path.join(os.tmpdir(), 'kvm-migrate-openapi-'));
try {
  const target = path.join(packageRoot, 'openapi', 'openapi.json');
  await fs.writeFile(target, await openapiDocument(scratch));
  process.stdout.write(`wrote ${target}\n`);
} finally {
  await fs.rm(scratch, { recursive: true, force: true });
}
