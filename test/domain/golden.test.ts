/**
 * Golden tests: fixtures/NAME.xml is normalized on a fixed host and its argv compared line by
 * line with NAME.argv (KVM host) and NAME.tcg.argv (TCG host) when present, and its normalized
 * XML with NAME.normalized.xml when present. UPDATE_GOLDEN=1 rewrites the expected files.
 */
import { existsSync, writeFileSync } from 'node:fs';
import t from 'tap';
import { buildArgv, normalizeDomainXml, parseDomainXml } from '../../src/domain/index.js';
import { countingHost, FIXTURES, fixtureNames, KVM_HOST, readFixture, TCG_HOST } from './helpers.js';

const update = process.env.UPDATE_GOLDEN === '1';

/** The expected text of `file`, rewritten first under UPDATE_GOLDEN; undefined when optional and absent. */
function expected(file: string, actual: string, always: boolean): string | undefined {
  if (update && (always || existsSync(FIXTURES + file))) writeFileSync(FIXTURES + file, actual);
  return existsSync(FIXTURES + file) ? readFixture(file) : undefined;
}

const names = fixtureNames();
t.ok(names.length >= 8, 'there are golden fixtures');

for (const name of names) {
  t.test(name, async (t) => {
    const { xml, def } = normalizeDomainXml(readFixture(`${name}.xml`), countingHost());
    const argv = buildArgv(def, KVM_HOST);
    const checks: [string, string, boolean][] = [
      [`${name}.argv`, `${argv.join('\n')}\n`, true],
      [`${name}.tcg.argv`, `${buildArgv(def, TCG_HOST).join('\n')}\n`, false],
      [`${name}.normalized.xml`, xml, false],
    ];
    for (const [file, actual, always] of checks) {
      const want = expected(file, actual, always);
      if (always) t.ok(want !== undefined, `${file} exists`);
      if (want !== undefined) t.equal(actual, want, file);
    }

    // The destination of a migration parses the stored (normalized) XML: same argv, byte for byte.
    t.same(buildArgv(parseDomainXml(xml), KVM_HOST), argv, 'the stored XML rebuilds the same argv');
    t.same(buildArgv(def, KVM_HOST), argv, 'building twice gives the same argv');
    t.ok(argv.every((a) => typeof a === 'string' && a.length > 0), 'no empty arguments');
  });
}
