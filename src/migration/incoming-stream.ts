/**
 * How much of an incoming migration stream has arrived, as the kernel counts it on qemu's
 * connection (iproute2's ss): the one sign of life of a source host that may have vanished
 * without a FIN or RST, which qemu itself never notices (it waits on the socket for ever).
 */
import { execa } from 'execa';

const SS_TIMEOUT_MS = 5000;

/**
 * Bytes received so far on the established TCP connections whose local end is host:port (qemu's
 * incoming listener); undefined when there is none.
 */
export async function incomingStreamBytes(host: string, port: number): Promise<number | undefined> {
  const local = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  const { stdout } = await execa('ss', ['-tinH', 'state', 'established', 'src', local], { timeout: SS_TIMEOUT_MS });
  const counts = [...stdout.matchAll(/\bbytes_received:(\d+)/g)].map((m) => Number(m[1]));
  return counts.length === 0 ? undefined : counts.reduce((a, b) => a + b, 0);
}
