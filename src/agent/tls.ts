/**
 * Peer trust by certificates of the fleet's CA (scripts/make-certs.sh): one certificate per
 * agent serves its HTTPS API, identifies it when it calls a peer (mutual TLS), and carries
 * qemu's migration stream (tls-creds-x509, both ends verifying the other).
 */
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';

export interface TlsFiles {
  certFile: string;
  keyFile: string;
  caFile: string;
}

export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

export function loadTls(files: TlsFiles): TlsMaterial {
  const read = (file: string, flag: string) => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new Error(`${flag} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  };
  return { cert: read(files.certFile, '--tls-cert'), key: read(files.keyFile, '--tls-key'), ca: read(files.caFile, '--tls-ca') };
}

/**
 * The directory qemu's tls-creds-x509 reads (the store makes it, 0700): the agent's one
 * certificate in both roles (it is made for serverAuth and clientAuth), written afresh at every
 * start from the configured files.
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
}

/** The id of qemu's credentials object for one end; a guest that arrived (server) may leave later (client). */
export const qemuTlsCredsId = (endpoint: 'server' | 'client') => `kvmm-tls-${endpoint}`;

/**
 * Gives a qemu fresh credentials for one end of a stream and makes its migration use them (the
 * files are read when the object is made, so an object left from an earlier migration is
 * replaced: certificates may have been renewed since). `hostname`: what the source checks the
 * destination's certificate against.
 */
export async function useQemuTls(
  qmp: { execute(cmd: string, args?: Record<string, unknown>): Promise<unknown> },
  dir: string,
  endpoint: 'server' | 'client',
  hostname?: string,
): Promise<void> {
  const id = qemuTlsCredsId(endpoint);
  await qmp.execute('object-del', { id }).catch(() => undefined);
  await qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id, dir, endpoint, 'verify-peer': true });
  await qmp.execute('migrate-set-parameters', { 'tls-creds': id, ...(hostname ? { 'tls-hostname': hostname } : {}) });
}
