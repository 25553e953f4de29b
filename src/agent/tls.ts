/**
 * Peer trust by certificates of the fleet's CA (scripts/make-certs.sh): one certificate per
 * agent serves its HTTPS API, identifies it when it calls a peer (mutual TLS), and carries
 * qemu's migration stream (tls-creds-x509, both ends verifying the other). A CRL of that CA, when
 * given, is honoured by all three.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';

export interface TlsFiles {
  certFile: string;
  keyFile: string;
  caFile: string;
  /** Certificates of the CA that are revoked (scripts/make-certs.sh DIR --revoke NAME). */
  crlFile?: string;
}

export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  crl?: Buffer;
}

export function loadTls(files: TlsFiles): TlsMaterial {
  const read = (file: string, flag: string) => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new Error(`${flag} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  };
  return {
    cert: read(files.certFile, '--tls-cert'),
    key: read(files.keyFile, '--tls-key'),
    ca: read(files.caFile, '--tls-ca'),
    ...(files.crlFile ? { crl: read(files.crlFile, '--tls-crl') } : {}),
  };
}

const DAY_MS = 24 * 60 * 60 * 1000;
/** Certificates are renewed by hand: a month's notice. */
const CERT_WARNING_DAYS = 30;
/** A CRL lives a month (make-certs.sh) and is reissued more often: a week's notice. */
const CRL_WARNING_DAYS = 7;
const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';

function pemCertificates(pem: Buffer, flag: string, file: string): X509Certificate[] {
  const blocks = pem.toString('utf8').match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((block) => {
    try {
      return new X509Certificate(block);
    } catch (err) {
      throw new Error(`${flag} ${file}: a certificate in it does not parse (${(err as Error).message})`);
    }
  });
}

/** Refuses a certificate outside its validity; a warning when it ends within `warnDays`. */
function checkValidity(cert: X509Certificate, what: string, now: number, renew: string): string | undefined {
  if (now < Date.parse(cert.validFrom)) throw new Error(`${what} is not valid before ${cert.validFrom}: check this host's clock`);
  const until = Date.parse(cert.validTo);
  if (now >= until) throw new Error(`${what} expired on ${cert.validTo}: ${renew}`);
  if (until - now < CERT_WARNING_DAYS * DAY_MS) return `${what} expires on ${cert.validTo}: ${renew}`;
  return undefined;
}

/**
 * Refuses at start what would otherwise fail only later, in some peer's or qemu's handshake,
 * with a vaguer error; returns warnings for what works now but soon will not.
 */
export async function checkTlsMaterial(files: TlsFiles, m: TlsMaterial, now = Date.now()): Promise<string[]> {
  const certWhat = `--tls-cert ${files.certFile}`;
  const [cert] = pemCertificates(m.cert, '--tls-cert', files.certFile);
  if (!cert) throw new Error(`${certWhat} holds no PEM certificate`);
  let key: KeyObject;
  try {
    key = createPrivateKey(m.key);
  } catch (err) {
    throw new Error(`--tls-key ${files.keyFile} is no private key (PEM): ${(err as Error).message}`);
  }
  if (!cert.checkPrivateKey(key)) {
    throw new Error(`--tls-key ${files.keyFile} is not the key of ${certWhat}: give the key made with that certificate (NAME-key.pem beside NAME.pem)`);
  }
  const cas = pemCertificates(m.ca, '--tls-ca', files.caFile).filter((c) => c.ca);
  if (cas.length === 0) throw new Error(`--tls-ca ${files.caFile} holds no CA certificate (basicConstraints CA:TRUE): give the fleet's ca.pem`);
  const issuer = cas.find((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey));
  if (!issuer) {
    throw new Error(`${certWhat} (issuer ${cert.issuer.replace(/\n/g, ', ')}) is not signed by the CA in --tls-ca ${files.caFile}: give a certificate this CA signed, or its CA`);
  }
  const usages = cert.keyUsage ?? [];
  const missing = [[SERVER_AUTH, 'serverAuth'], [CLIENT_AUTH, 'clientAuth']].filter(([oid]) => !usages.includes(oid!)).map(([, name]) => name);
  if (missing.length > 0) {
    throw new Error(`${certWhat} lacks the extended key usage ${missing.join(' and ')}: it serves the agent's HTTPS and identifies it to peers, so it needs extendedKeyUsage=serverAuth,clientAuth (scripts/make-certs.sh makes it so)`);
  }
  const warnings = [
    checkValidity(cert, certWhat, now, 'make a new one (scripts/make-certs.sh DIR NAME=ADDR) and restart the agent'),
    checkValidity(issuer, `the CA in --tls-ca ${files.caFile}`, now, "a new CA means new certificates for the whole fleet"),
  ];
  if (m.crl) warnings.push(await checkCrl(files.crlFile!, m.crl, files.caFile, now));
  return warnings.filter((w): w is string => w !== undefined);
}

/**
 * The CRL must be the CA's, and current: past its nextUpdate Node and qemu refuse every
 * certificate checked against it, so every peer. node:crypto has no CRL parser: openssl reads
 * it (`-CAfile` checks its signature).
 */
async function checkCrl(crlFile: string, crl: Buffer, caFile: string, now: number): Promise<string | undefined> {
  const what = `--tls-crl ${crlFile}`;
  const count = crl.toString('utf8').match(/-----BEGIN X509 CRL-----/g)?.length ?? 0;
  if (count !== 1) throw new Error(`${what} must hold one PEM CRL, the fleet CA's; it holds ${count}`);
  const r = await execa('openssl', ['crl', '-CAfile', caFile, '-noout', '-nextupdate'], { input: crl, reject: false, timeout: 10_000 });
  if ((r as { code?: string }).code === 'ENOENT') throw new Error(`${what}: checking a CRL needs the openssl command (apt-get install openssl)`);
  if (r.exitCode !== 0 || r.stderr.trim() !== 'verify OK') {
    throw new Error(`${what} is not signed by the CA in --tls-ca ${caFile} (openssl: ${r.stderr.trim().split('\n')[0]}): make it with that CA (scripts/make-certs.sh DIR --crl)`);
  }
  const nextUpdate = /^nextUpdate=(.+)$/m.exec(r.stdout)?.[1];
  // NONE: a CRL that never goes stale.
  if (nextUpdate === undefined || nextUpdate === 'NONE') return undefined;
  const until = Date.parse(nextUpdate);
  if (!Number.isFinite(until)) throw new Error(`${what}: its nextUpdate ${JSON.stringify(nextUpdate)} is no date`);
  const renew = 'write a new one (scripts/make-certs.sh DIR --crl) and restart the agents';
  if (now >= until) throw new Error(`${what} expired on ${nextUpdate} (its nextUpdate): peers' certificates cannot be checked against it; ${renew}`);
  if (until - now < CRL_WARNING_DAYS * DAY_MS) return `${what} expires on ${nextUpdate}: ${renew}`;
  return undefined;
}

/**
 * The directory qemu's tls-creds-x509 reads (the store makes it, 0700): the agent's one
 * certificate in both roles (it is made for serverAuth and clientAuth), and the CRL when given,
 * written afresh at every start from the configured files.
 */
export async function writeQemuTlsDir(dir: string, m: TlsMaterial): Promise<void> {
  const files: Array<[string, Buffer]> = [
    ['ca-cert.pem', m.ca],
    ['server-cert.pem', m.cert],
    ['server-key.pem', m.key],
    ['client-cert.pem', m.cert],
    ['client-key.pem', m.key],
  ];
  for (const [name, content] of files) await writeFile(path.join(dir, name), content, { mode: 0o600 });
  // qemu honours a CRL when the file is there; one left by an earlier start must go with the flag.
  if (m.crl) await writeFile(path.join(dir, 'ca-crl.pem'), m.crl, { mode: 0o600 });
  else await rm(path.join(dir, 'ca-crl.pem'), { force: true });
}
