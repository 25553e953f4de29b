import net from 'node:net';

/** True when nothing listens on host:port right now (bind and release at once). */
export function portIsFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host, port, exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/**
 * The first port of the range that is neither reserved nor bound by anyone. `reserve` is called
 * for each candidate before probing it, so concurrent callers never probe the same port.
 */
export async function pickPort(
  host: string,
  range: { low: number; high: number },
  reserved: Set<number>,
  reserve: (port: number) => void,
): Promise<number | null> {
  for (let port = range.low; port <= range.high; port++) {
    if (reserved.has(port)) continue;
    reserve(port);
    if (await portIsFree(host, port)) return port;
  }
  return null;
}

/** A port the kernel reports free right now on `host` (bind to port 0 and release). */
export function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
