import { execFile } from 'node:child_process';
import path from 'node:path';
import { packageRoot } from '../../src/agent/package-root.js';

const CLI = path.join(packageRoot, 'dist', 'bin', 'kvm-migrate.js');

/** The real `kvm-migrate` command line, run to its end (bounded); `env` adds to the test's own. */
export function runCli(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 120_000, env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}
