import t from 'tap';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import semver from 'semver';
import { packageRoot } from '../../src/agent/package-root.js';

const run = promisify(execFile);

interface PackageJson {
  name: string;
  license?: string;
  engines?: { node?: string };
  dependencies?: Record<string, string>;
}

async function readPackage(dir: string): Promise<PackageJson> {
  return JSON.parse(await fs.readFile(path.join(dir, 'package.json'), 'utf8'));
}

async function sourceFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await sourceFiles(p)));
    else if (entry.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

t.test('product code imports nothing from test/', async (t) => {
  const offenders: string[] = [];
  for (const top of ['src', 'routes', 'bin']) {
    for (const file of await sourceFiles(path.join(packageRoot, top))) {
      const text = await fs.readFile(file, 'utf8');
      for (const m of text.matchAll(/from '([^']+)'|import\('([^']+)'\)/g)) {
        const spec = m[1] ?? m[2]!;
        if (spec.startsWith('.') && path.resolve(path.dirname(file), spec).startsWith(path.join(packageRoot, 'test') + path.sep)) {
          offenders.push(`${path.relative(packageRoot, file)} -> ${spec}`);
        }
      }
    }
  }
  t.same(offenders, [], 'no import of test code');
});

t.test('npm pack: no test files, no dangling source maps, a LICENSE', async (t) => {
  const { stdout } = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: packageRoot, maxBuffer: 16 * 1024 * 1024 });
  const files = (JSON.parse(stdout) as Array<{ files: Array<{ path: string }> }>)[0]!.files.map((f) => f.path);
  t.same(files.filter((f) => /(^|\/)test\/|\.test\.js$|^dist\/bench\//.test(f)), [], 'no tests or benchmarks');
  t.ok(files.includes('LICENSE'), 'LICENSE');
  t.ok(files.includes('dist/bin/kvm-migrate.js'), 'the CLI');
  t.ok(files.includes('src/guest/boot.bin'), 'the test guest the demo and the accelerator probe boot');
  t.ok(files.includes('src/guest/linux-init.sh'), "the Linux test guest's /init, which ensureLinuxGuest reads");
  t.ok(files.includes('openapi/openapi.json'), 'the OpenAPI document');
  const dangling: string[] = [];
  for (const map of files.filter((f) => f.endsWith('.map'))) {
    const parsed = JSON.parse(await fs.readFile(path.join(packageRoot, map), 'utf8')) as { sources: string[]; sourcesContent?: Array<string | null> };
    parsed.sources.forEach((source, i) => {
      const shipped = files.includes(path.normalize(path.join(path.dirname(map), source)));
      if (!shipped && typeof parsed.sourcesContent?.[i] !== 'string') dangling.push(`${map}: ${source}`);
    });
  }
  t.same(dangling, [], 'every source map carries or ships its sources');
  const license = await fs.readFile(path.join(packageRoot, 'LICENSE'), 'utf8');
  t.match(license, /^MIT License/, 'the LICENSE is the one package.json names');
  t.equal((await readPackage(packageRoot)).license, 'MIT');
});

t.test("engines: the lowest Node the package allows is one every runtime dependency allows", async (t) => {
  const own = await readPackage(packageRoot);
  const lowest = semver.minVersion(own.engines!.node!)!;
  const seen = new Set<string>();
  const conflicts: string[] = [];
  const visit = async (name: string, from: string): Promise<void> => {
    // Node's own resolution: the nearest node_modules upwards from the dependant.
    let dir = from;
    for (;;) {
      const candidate = path.join(dir, 'node_modules', name);
      if (await fs.stat(candidate).catch(() => null)) {
        if (seen.has(candidate)) return;
        seen.add(candidate);
        const pkg = await readPackage(candidate);
        const wanted = pkg.engines?.node;
        if (wanted && !semver.satisfies(lowest, wanted)) conflicts.push(`${pkg.name} wants node ${wanted}`);
        for (const dep of Object.keys(pkg.dependencies ?? {})) await visit(dep, candidate);
        return;
      }
      if (dir === packageRoot || dir === path.dirname(dir)) throw new Error(`${name} (needed by ${from}) is not installed`);
      dir = path.dirname(dir);
    }
  };
  for (const dep of Object.keys(own.dependencies ?? {})) await visit(dep, packageRoot);
  t.ok(seen.size > 10, `${seen.size} runtime packages checked against node ${lowest}`);
  t.same(conflicts, [], `engines.node ${own.engines!.node} is enough for all of them`);
  t.ok(semver.satisfies(process.versions.node, own.engines!.node!), `this Node (${process.versions.node}) is allowed`);
});
