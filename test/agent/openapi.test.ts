import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { openapiDocument } from '../../src/agent/openapi.js';
import { packageRoot } from '../../src/agent/package-root.js';
import { startAgent, tmpDir } from '../helpers/agents.js';

t.test('the committed OpenAPI document is current', async (t) => {
  const dir = await tmpDir(t);
  const generated = await openapiDocument(dir);
  const committed = await fs.readFile(path.join(packageRoot, 'openapi', 'openapi.json'), 'utf8').catch(() => '');
  t.ok(generated === committed, 'openapi/openapi.json matches the routes; regenerate with `npm run openapi`');
});

t.test('every route has a documented response and the document is served', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const doc = await client.call<{ openapi: string; paths: Record<string, Record<string, { responses?: object }>> }>('GET', '/documentation/json');
  t.match(doc.openapi, /^3\./);
  for (const route of ['/health', '/host', '/domains', '/domains/{name}', '/domains/{name}/xml', '/domains/{name}/start', '/domains/{name}/shutdown', '/domains/{name}/destroy', '/perform', '/prepare2', '/finish2', '/jobs', '/jobs/{id}', '/jobs/{id}/cancel']) {
    t.ok(doc.paths[route], `${route} documented`);
    for (const [method, op] of Object.entries(doc.paths[route] ?? {})) {
      t.ok(op.responses && Object.keys(op.responses).length > 0, `${method.toUpperCase()} ${route} has responses`);
    }
  }
});
