// An agent started with TLS material that would fail in some later handshake refuses to start,
// saying which flag's file is wrong and what to do; material that soon expires is warned about.
import t from 'tap';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { buildAgent } from '../../src/agent/app.js';
import { packageRoot } from '../../src/agent/package-root.js';
import type { TlsFiles } from '../../src/agent/tls.js';
import { agentConfig, tmpDir } from '../helpers/agents.js';
import { runCli } from '../helpers/cli.js';

const run = promisify(execFile);
const openssl = (...args: string[]) => run('openssl', args, { timeout: 30_000 });
const makeCerts = (...args: string[]) => run('bash', [path.join(packageRoot, 'scripts', 'make-certs.sh'), ...args], { timeout: 60_000 });
const DAY_MS = 24 * 60 * 60 * 1000;
/** openssl ca's date form, YYYYMMDDHHMMSSZ. */
const asn1Date = (ms: number) => `${new Date(ms).toISOString().replace(/[-:T]/g, '').slice(0, 14)}Z`;

/**
 * A certificate for `name` signed by the CA in `certs`, with the validity and extensions given:
 * what make-certs.sh would not make. Its own database, so the fleet's index.txt is not touched.
 */
async function oddCertificate(certs: string, name: string, o: { from: number; until: number; ext: string[] }): Promise<void> {
  const work = await fs.mkdtemp(path.join(certs, 'odd-'));
  await fs.writeFile(path.join(work, 'index.txt'), '');
  await fs.writeFile(path.join(work, 'ca.cnf'), ['[ca]', 'default_ca = odd', '[odd]', `database = ${work}/index.txt`, `new_certs_dir = ${work}`,
    `certificate = ${certs}/ca.pem`, `private_key = ${certs}/ca-key.pem`, 'default_md = sha256', 'rand_serial = yes', 'policy = any', '[any]', 'commonName = supplied', ''].join('\n'));
  await fs.writeFile(path.join(work, 'ext'), `${o.ext.join('\n')}\n`);
  await openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', `/CN=${name}`,
    '-keyout', path.join(certs, `${name}-key.pem`), '-out', path.join(work, 'csr'));
  await openssl('ca', '-batch', '-notext', '-config', path.join(work, 'ca.cnf'), '-in', path.join(work, 'csr'),
    '-startdate', asn1Date(o.from), '-enddate', asn1Date(o.until), '-extfile', path.join(work, 'ext'), '-out', path.join(certs, `${name}.pem`));
  await fs.rm(work, { recursive: true });
}

const LEAF_EXT = ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment', 'subjectAltName=IP:127.0.0.2'];
const BOTH_USAGES = 'extendedKeyUsage=serverAuth,clientAuth';

function files(certs: string, name: string, over: Partial<TlsFiles> = {}): TlsFiles {
  return { certFile: path.join(certs, `${name}.pem`), keyFile: path.join(certs, `${name}-key.pem`), caFile: path.join(certs, 'ca.pem'), ...over };
}

t.test('each kind of unusable TLS material is refused at start, naming the flag and file', async (t) => {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  const rogue = path.join(dir, 'rogue');
  const other = path.join(dir, 'other');
  await makeCerts(certs, 'hosta=127.0.0.2', 'hostb=127.0.0.3');
  // The same CA name as the fleet's (its issuer name matches, its signature does not), and another name.
  await makeCerts(rogue, 'hostc=127.0.0.2');
  await fs.mkdir(other);
  await openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '30', '-subj', '/CN=another CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-keyout', path.join(other, 'ca-key.pem'), '-out', path.join(other, 'ca.pem'));
  const now = Date.now();
  await oddCertificate(certs, 'expired', { from: now - 60 * DAY_MS, until: now - DAY_MS, ext: [...LEAF_EXT, BOTH_USAGES] });
  await oddCertificate(certs, 'future', { from: now + DAY_MS, until: now + 60 * DAY_MS, ext: [...LEAF_EXT, BOTH_USAGES] });
  await oddCertificate(certs, 'serveronly', { from: now - DAY_MS, until: now + 60 * DAY_MS, ext: [...LEAF_EXT, 'extendedKeyUsage=serverAuth'] });
  await oddCertificate(certs, 'nousage', { from: now - DAY_MS, until: now + 60 * DAY_MS, ext: LEAF_EXT });
  // A CRL of another CA, and one past its nextUpdate (openssl ca -crlsec 1, then a wait).
  await makeCerts(rogue, '--revoke', 'hostc');
  await openssl('ca', '-config', path.join(certs, 'ca.cnf'), '-gencrl', '-crlsec', '1', '-out', path.join(certs, 'stale-crl.pem'));
  await new Promise((r) => setTimeout(r, 1500));
  await fs.writeFile(path.join(certs, 'two-crls.pem'), Buffer.concat([await fs.readFile(path.join(certs, 'stale-crl.pem')), await fs.readFile(path.join(rogue, 'crl.pem'))]));

  const cases: Array<{ what: string; tls: TlsFiles; message: RegExp }> = [
    { what: 'the key of another certificate', tls: files(certs, 'hosta', { keyFile: path.join(certs, 'hostb-key.pem') }), message: /^--tls-key \S+hostb-key\.pem is not the key of --tls-cert \S+hosta\.pem: give the key made with that certificate/ },
    { what: 'no key at all', tls: files(certs, 'hosta', { keyFile: path.join(certs, 'hosta.pem') }), message: /^--tls-key \S+hosta\.pem is no private key/ },
    { what: 'a certificate of another CA of the same name', tls: files(rogue, 'hostc', { caFile: path.join(certs, 'ca.pem') }), message: /^--tls-cert \S+rogue\/hostc\.pem \(issuer CN=kvm-migrate fleet CA\) is not signed by the CA in --tls-ca \S+certs\/ca\.pem/ },
    { what: 'a certificate of another CA', tls: files(certs, 'hosta', { caFile: path.join(other, 'ca.pem') }), message: /^--tls-cert \S+hosta\.pem .*is not signed by the CA in --tls-ca \S+other\/ca\.pem/ },
    { what: 'a CA file without a CA', tls: files(certs, 'hosta', { caFile: path.join(certs, 'hostb.pem') }), message: /^--tls-ca \S+hostb\.pem holds no CA certificate/ },
    { what: 'an expired certificate', tls: files(certs, 'expired'), message: /^--tls-cert \S+expired\.pem expired on .*: make a new one/ },
    { what: 'a certificate not yet valid', tls: files(certs, 'future'), message: /^--tls-cert \S+future\.pem is not valid before .*: check this host's clock/ },
    { what: 'a certificate for serverAuth only', tls: files(certs, 'serveronly'), message: /^--tls-cert \S+serveronly\.pem lacks the extended key usage clientAuth: / },
    { what: 'a certificate without extended key usages', tls: files(certs, 'nousage'), message: /lacks the extended key usage serverAuth and clientAuth/ },
    { what: 'a CRL of another CA', tls: files(certs, 'hosta', { crlFile: path.join(rogue, 'crl.pem') }), message: /^--tls-crl \S+rogue\/crl\.pem is not signed by the CA in --tls-ca \S+certs\/ca\.pem \(openssl: verify failure\)/ },
    { what: 'a CRL past its nextUpdate', tls: files(certs, 'hosta', { crlFile: path.join(certs, 'stale-crl.pem') }), message: /^--tls-crl \S+stale-crl\.pem expired on .* \(its nextUpdate\).*scripts\/make-certs\.sh DIR --crl/ },
    { what: 'two CRLs in one file', tls: files(certs, 'hosta', { crlFile: path.join(certs, 'two-crls.pem') }), message: /must hold one PEM CRL, the fleet CA's; it holds 2/ },
  ];
  for (const c of cases) {
    const config = agentConfig(dir, 'refused', { listenHost: '127.0.0.2', migrationAddress: '127.0.0.2', tls: c.tls });
    await t.rejects(buildAgent(config), { message: c.message }, c.what);
  }
  await t.rejects(fs.access(path.join(dir, 'refused')), 'a refused agent made no state directory');

  // The operator sees the same on the command line, and the exit code of a failed start.
  const cli = await runCli(['agent', '--listen', '127.0.0.2:0', '--state-dir', path.join(dir, 'cli'), '--accel', 'tcg', '--tls-cert', path.join(certs, 'hosta.pem'),
    '--tls-key', path.join(certs, 'hostb-key.pem'), '--tls-ca', path.join(certs, 'ca.pem')], { KVM_MIGRATE_TOKEN: 'x' });
  t.equal(cli.code, 1, 'the CLI agent exits 1');
  t.match(cli.stderr, /kvm-migrate: --tls-key \S+hostb-key\.pem is not the key of --tls-cert/, 'with the message');
  const crlAlone = await runCli(['agent', '--state-dir', path.join(dir, 'cli'), '--tls-crl', path.join(certs, 'crl.pem')], { KVM_MIGRATE_TOKEN: 'x' });
  t.equal(crlAlone.code, 64, '--tls-crl without the rest is a usage error');
  t.match(crlAlone.stderr, /--tls-crl goes with --tls-cert, --tls-key and --tls-ca/, 'saying so');
});

t.test('a certificate or CRL that expires soon is warned about; the agent starts', async (t) => {
  const dir = await tmpDir(t);
  const certs = path.join(dir, 'certs');
  await makeCerts(certs, 'hosta=127.0.0.2');
  const now = Date.now();
  await oddCertificate(certs, 'soon', { from: now - DAY_MS, until: now + 10 * DAY_MS, ext: [...LEAF_EXT, BOTH_USAGES] });
  await openssl('ca', '-config', path.join(certs, 'ca.cnf'), '-gencrl', '-crldays', '3', '-out', path.join(certs, 'crl.pem'));
  const lines: string[] = [];
  const stream = new Writable({ write: (chunk: Buffer, _enc, done) => { lines.push(chunk.toString()); done(); } });
  const config = agentConfig(dir, 'a', { listenHost: '127.0.0.2', migrationAddress: '127.0.0.2', tls: files(certs, 'soon', { crlFile: path.join(certs, 'crl.pem') }) });
  const app = await buildAgent(config, { logger: { level: 'warn', stream } });
  t.teardown(() => app.close());
  const warnings = lines.map((l) => JSON.parse(l) as { level: number; msg: string }).filter((l) => l.level === 40).map((l) => l.msg);
  t.ok(warnings.some((w) => /^--tls-cert \S+soon\.pem expires on .*: make a new one/.test(w)), 'the certificate: within 30 days');
  t.ok(warnings.some((w) => /^--tls-crl \S+crl\.pem expires on .*: write a new one \(scripts\/make-certs\.sh DIR --crl\)/.test(w)), 'the CRL: within 7 days');
  t.equal(await fs.readFile(path.join(config.stateDir, 'tls', 'ca-crl.pem'), 'utf8'), await fs.readFile(path.join(certs, 'crl.pem'), 'utf8'), "qemu's credentials carry the CRL");
});
