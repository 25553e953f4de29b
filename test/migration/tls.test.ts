// Two credentials, two jobs: operators use the token, agents know each other by certificates of
// the fleet's CA (mutual TLS), and qemu's stream runs over TLS too.
import t from 'tap';
import { execFile } from 'node:child_process';
import os from 'node:os';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { Agent, request } from 'undici';
import { packageRoot } from '../../src/agent/package-root.js';
import { AgentClient } from '../../src/client.js';
import type { AgentConfig } from '../../src/config.js';
import { qemuTlsCredsId } from '../../src/qemu/migration-monitor.js';
import { startAgent, tmpDir, type TestContext } from '../helpers/agents.js';
import { assertOwnedBy, guestQmp, startGuest, waitForPasses } from '../helpers/migration.js';

const run = promisify(execFile);

/** The README's how-to: scripts/make-certs.sh makes the CA and one certificate per agent. */
async function makeCerts(dir: string, ...hosts: string[]): Promise<void> {
  await run('bash', [path.join(packageRoot, 'scripts', 'make-certs.sh'), dir, ...hosts]);
}

function tlsOf(certs: string, name: string): Pick<AgentConfig, 'tls'> {
  return { tls: { certFile: path.join(certs, `${name}.pem`), keyFile: path.join(certs, `${name}-key.pem`), caFile: path.join(certs, 'ca.pem') } };
}

async function tlsAgent(t: TestContext, dir: string, name: string, ip: string, low: number, certs: string, certName = name, token = `${name}-operator-token`) {
  return startAgent(t, dir, name, { listenHost: ip, migrationAddress: ip, migrationPorts: { low, high: low + 15 }, token, ...tlsOf(certs, certName) });
}

/** Agents A (127.0.0.2) and B (127.0.0.3) with certificates of one fleet CA. */
async function tlsPair(t: TestContext) {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  await makeCerts(certs, 'hosta=127.0.0.2', 'hostb=127.0.0.3');
  const a = await tlsAgent(t, dir, 'hosta', '127.0.0.2', 49152, certs);
  const b = await tlsAgent(t, dir, 'hostb', '127.0.0.3', 49184, certs);
  return { dir, certs, a, b };
}

t.test('a migration A->B->A over mutual TLS, with a TLS stream; each agent has its own operator token', async (t) => {
  const { dir, a, b } = await tlsPair(t);
  t.match(a.url, /^https:/);
  // Each TLS channel encrypts on a core: one per core (a plain stream's default is 8).
  t.equal((await a.client.host()).migrationChannels, Math.min(os.availableParallelism(), 8), 'a TLS agent streams on one channel per core');
  const { boot } = await startGuest(a, dir, 'vm1');

  let passes = boot.passes;
  for (const [from, to] of [[a, b], [b, a]] as const) {
    const { job } = await from.client.perform({ domain: 'vm1', destination: to.url }, true);
    t.equal(job.status, 'completed', `${from.url} -> ${to.url}: ${job.error?.message ?? 'completed'}`);
    await assertOwnedBy(t, to, from, 'vm1');
    const params = await guestQmp(to, 'vm1').execute<{ 'tls-creds'?: string }>('query-migrate-parameters');
    t.equal(params['tls-creds'], qemuTlsCredsId('server'), 'the destination qemu took the stream over TLS only');
    const after = await waitForPasses(to, 'vm1', passes);
    t.equal(after.bootId, boot.bootId, 'same boot: the guest kept running');
    passes = after.passes;
  }
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('peers are known by certificate: a wrong one is refused before anything is sent', async (t) => {
  const dir = await tmpDir(t);
  const fleet = path.join(dir, 'fleet');
  const rogue = path.join(dir, 'rogue');
  await makeCerts(fleet, 'hosta=127.0.0.2', 'hostb=127.0.0.3', 'other=127.0.0.9');
  await makeCerts(rogue, 'hostc=127.0.0.4');
  const a = await tlsAgent(t, dir, 'hosta', '127.0.0.2', 49152, fleet);
  // A CA of its own, and the fleet's certificate of another host: neither is the peer at 127.0.0.4.
  const ownCa = await tlsAgent(t, dir, 'hostc', '127.0.0.4', 49184, rogue);
  const wrongHost = await startAgent(t, dir, 'misnamed', { listenHost: '127.0.0.5', migrationAddress: '127.0.0.5', migrationPorts: { low: 49200, high: 49215 }, token: 'x', ...tlsOf(fleet, 'other') });
  await startGuest(a, dir, 'vm2');
  for (const peer of [ownCa, wrongHost]) {
    const { job } = await a.client.perform({ domain: 'vm2', destination: peer.url }, true);
    t.equal(job.status, 'failed', `${peer.url}: refused`);
    t.equal(job.error?.code, 'peer_certificate_rejected', 'the TLS handshake fails');
    t.match(job.error?.message, /certificate|altnames|self-signed|unable to verify/i, job.error?.message ?? '');
    t.same(peer.app.agent.migrations.jobs.list(), [], 'the peer got no Prepare2');
    t.equal((await a.client.domain('vm2')).state, 'running', 'the guest stays on the source');
  }
  await t.rejects(a.client.perform({ domain: 'vm2', destination: 'http://127.0.0.3:7100' }), { status: 400, code: 'destination_not_a_peer' }, 'plain http to a peer is refused outright');
  await a.client.lifecycle('vm2', 'destroy');
});

t.test('a revoked certificate is refused both ways: as a destination and as a caller of the protocol routes', async (t) => {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  await makeCerts(certs, 'hosta=127.0.0.2', 'hostb=127.0.0.3');
  await makeCerts(certs, '--revoke', 'hostb');
  const crl = { crlFile: path.join(certs, 'crl.pem') };
  const a = await startAgent(t, dir, 'hosta', { listenHost: '127.0.0.2', migrationAddress: '127.0.0.2', migrationPorts: { low: 49152, high: 49167 }, token: 'a', tls: { ...tlsOf(certs, 'hosta').tls!, ...crl } });
  // The revoked agent itself does not know (its CRL is older, or none): the source must refuse.
  const b = await tlsAgent(t, dir, 'hostb', '127.0.0.3', 49184, certs);
  await startGuest(a, dir, 'vm5');

  const { job } = await a.client.perform({ domain: 'vm5', destination: b.url }, true);
  t.equal(job.status, 'failed', 'the migration fails');
  t.equal(job.error?.code, 'peer_certificate_rejected');
  t.match(job.error?.message, /presented a certificate this agent does not accept \(CERT_REVOKED\): certificate revoked/);
  t.same(b.app.agent.migrations.jobs.list(), [], 'the revoked agent got no Prepare2');
  t.equal((await a.client.domain('vm5')).state, 'running', 'the guest keeps running on the source');

  // The revoked certificate as a client one: refused, saying why; a valid one gets past the check.
  const ca = await fs.readFile(path.join(certs, 'ca.pem'));
  const withCertificate = async (name: string) => {
    const dispatcher = new Agent({ connect: { ca, cert: await fs.readFile(path.join(certs, `${name}.pem`)), key: await fs.readFile(path.join(certs, `${name}-key.pem`)) } });
    t.teardown(() => dispatcher.close());
    const res = await request(`${a.url}/finish2`, { method: 'POST', dispatcher, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ migrationId: 'x', rc: 1 }) });
    return { status: res.statusCode, body: (await res.body.json()) as { code: string; message: string } };
  };
  const revoked = await withCertificate('hostb');
  t.equal(revoked.status, 401, 'a revoked client certificate is refused');
  t.equal(revoked.body.code, 'peer_certificate_required');
  t.match(revoked.body.message, /the one presented was refused: CERT_REVOKED/);
  t.not((await withCertificate('hosta')).body.code, 'peer_certificate_required', 'a certificate not revoked is taken');
  await a.client.lifecycle('vm5', 'destroy');
});

// qemu reads ca-crl.pem as the stream's server only (the destination checking the source's
// client certificate); the source's agent already checked the destination's in Prepare2.
t.test("the destination's qemu checks the source's certificate against the CRL (STATE_DIR/tls/ca-crl.pem)", async (t) => {
  const { dir, certs, a, b } = await tlsPair(t);
  await startGuest(a, dir, 'vm6');
  // After the agents started, so only qemu (given a fresh copy of tls/ per migration) knows.
  await makeCerts(certs, '--revoke', 'hosta');
  await fs.copyFile(path.join(certs, 'crl.pem'), path.join(b.config.stateDir, 'tls', 'ca-crl.pem'));

  const { job } = await a.client.perform({ domain: 'vm6', destination: b.url }, true);
  t.equal(job.status, 'failed', 'the stream is refused');
  t.match(job.error, { code: 'stream_failed', message: /TLS/ }, `${job.error?.code}: ${job.error?.message}`);
  t.equal((await a.client.domain('vm6')).state, 'running', 'the guest keeps running on the source');
  t.same(await b.client.domains(), [], 'nothing is left on the destination');
  await a.client.lifecycle('vm6', 'destroy');
});

t.test('a certificate for several addresses (IPv4, IPv6, DNS names) names them all; a peer may use any', async (t) => {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  await makeCerts(certs, 'hosta=10.0.0.1,hosta.example,fd00::1,[::2],127.0.0.2', 'hostb=hostb');
  const san = async (name: string) => (await run('openssl', ['x509', '-in', path.join(certs, `${name}.pem`), '-noout', '-ext', 'subjectAltName'])).stdout.split('\n')[1]!.trim();
  t.equal(await san('hosta'), 'IP Address:10.0.0.1, DNS:hosta.example, IP Address:FD00:0:0:0:0:0:0:1, IP Address:0:0:0:0:0:0:0:2, IP Address:127.0.0.2, DNS:hosta');
  t.equal(await san('hostb'), 'DNS:hostb', 'the name once, though given twice');
  await t.rejects(makeCerts(certs, 'hostc=127.0.0.4,,hostc.example'), { code: 64, stderr: /an empty address in hostc=127\.0\.0\.4,,hostc\.example/ });
  // Reached by the last of its addresses, the certificate still names it.
  const a = await tlsAgent(t, dir, 'hosta', '127.0.0.2', 49152, certs);
  t.equal((await a.client.call<{ status: string }>('GET', '/health')).status, 'ok', 'the host checks out');
});

t.test('the protocol routes answer peers only, the operator routes operators only', async (t) => {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  await makeCerts(certs, 'hosta=127.0.0.2');
  const a = await tlsAgent(t, dir, 'hosta', '127.0.0.2', 49152, certs, 'hosta', 'the-operator-token');
  const ca = await fs.readFile(path.join(certs, 'ca.pem'));
  const operator = new AgentClient(a.url, 'the-operator-token', { ca });
  await t.rejects(operator.call('POST', '/finish2', { migrationId: 'x', rc: 1 }), { status: 401, code: 'peer_certificate_required' }, 'the token opens no protocol route');
  await t.rejects(operator.call('POST', '/prepare2', {}), { status: 401, code: 'peer_certificate_required' });
  t.ok((await operator.host()).uuid, 'the token opens the operator routes');
  await t.rejects(new AgentClient(a.url, undefined, { ca }).call('GET', '/domains'), { status: 401, code: 'unauthorized' }, 'nothing without it');
});

t.test('without TLS, a destination must be a --peer (or loopback for an agent on loopback)', async (t) => {
  const dir = await tmpDir(t);
  const a = await startAgent(t, dir, 'a', { listenHost: '127.0.0.2', migrationAddress: '127.0.0.2' });
  await startGuest(a, dir, 'vm3');
  for (const destination of ['http://192.0.2.1:7100', 'http://example.invalid:7100']) {
    await t.rejects(a.client.perform({ domain: 'vm3', destination }), { status: 400, code: 'destination_not_a_peer' }, `${destination}: refused before anything is sent`);
  }
  await a.client.lifecycle('vm3', 'destroy');
});
