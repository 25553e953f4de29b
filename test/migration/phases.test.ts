// The phase table (src/migration/phases.ts) as the one place that says what each phase obliges:
// consistent with the moves the model allows, documented row by row in docs/protocol.md, and
// records written under the roles' former phase names read under today's.
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { JobRegistry } from '../../src/migration/jobs.js';
import { canMove, DESTINATION_OBLIGATIONS, DESTINATION_PHASES, SOURCE_OBLIGATIONS, SOURCE_PHASES, type PhaseObligations } from '../../src/migration/phases.js';
import { StateStore } from '../../src/store/state-store.js';

const protocol = readFileSync(fileURLToPath(new URL('../../../docs/protocol.md', import.meta.url)), 'utf8');

t.test('the roles\' phases have names of their own; only done is shared', async (t) => {
  t.same(SOURCE_PHASES.filter((p) => (DESTINATION_PHASES as readonly string[]).includes(p)), ['done']);
});

t.test('a cancel rolls back exactly where the source still decides, and the model allows that rollback', async (t) => {
  for (const phase of SOURCE_PHASES) {
    const o = SOURCE_OBLIGATIONS[phase];
    t.equal(o.cancel === 'rolls-back', o.decides === 'source', `${phase}: cancel ${o.cancel}, decided by ${o.decides}`);
    if (o.cancel === 'rolls-back') t.ok(canMove('source', phase, 'rolling-back'), `${phase} may move to rolling-back`);
  }
  for (const phase of DESTINATION_PHASES) t.equal(DESTINATION_OBLIGATIONS[phase].cancel, 'refused', `destination ${phase}: only the source cancels`);
});

t.test('every phase waiting on its peer has a bound, except where only the peer may decide', async (t) => {
  for (const phase of DESTINATION_PHASES) {
    const { decides, bound } = DESTINATION_OBLIGATIONS[phase];
    // A destination never waits for ever with an empty qemu: once in postcopy its qemu runs the guest.
    t.not(bound.kind, 'waits-for-peer', `destination ${phase}: ${bound.kind}`);
    if (decides === 'source' && phase !== 'starting-incoming') t.ok(['lease', 'stream-watch'].includes(bound.kind), `destination ${phase} is bounded while the source decides`);
  }
  for (const phase of SOURCE_PHASES) {
    const { decides, bound } = SOURCE_OBLIGATIONS[phase];
    // In postcopy the source waits for the stream (recovering it), then for the destination's word.
    t.equal(bound.kind === 'waits-for-peer' || bound.kind === 'postcopy-recovery', decides === 'destination', `source ${phase}: waits for its peer only where the peer decides`);
  }
});

t.test('docs/protocol.md has a row for every phase, with the code\'s rules word for word', async (t) => {
  for (const [role, phases, table] of [['source', SOURCE_PHASES, SOURCE_OBLIGATIONS], ['destination', DESTINATION_PHASES, DESTINATION_OBLIGATIONS]] as const) {
    for (const phase of phases) {
      if (phase === 'done') continue;
      const o: PhaseObligations = (table as Record<string, PhaseObligations>)[phase]!;
      const row = new RegExp(`^\\| ${role} \\| \`${phase}\` \\| ([^|]*) \\| ([^|]*) \\| [^|]* \\| ([^|]*) \\| ([^|]*) \\|$`, 'm').exec(protocol);
      t.ok(row, `${role} ${phase} has a row`);
      const cancel = role === 'destination' ? '—' : o.cancel === 'rolls-back' ? 'rolls back' : 'refused';
      t.same(row?.slice(1), [o.decides, cancel, o.restart, o.crash], `${role} ${phase}: decides, cancel, restart, crash`);
    }
  }
});

t.test('records written under the former phase names are read under today\'s', async (t) => {
  const root = await mkdtemp(path.join(tmpdir(), 'km-phases-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  await mkdir(path.join(root, 'jobs'), { recursive: true });
  const record = (id: string, role: string, phase: string, history: string[]) => ({
    id, role, domain: 'vm', uuid: '6d2c5f3e-2a1b-4c3d-9e8f-0a1b2c3d4e5f', status: 'running', phase, options: {}, peer: {},
    createdAt: '2026-01-01T00:00:00.000Z', updatedAt: '2026-01-01T00:00:00.000Z', phaseHistory: history.map((p) => ({ phase: p, at: '2026-01-01T00:00:00.000Z' })), timings: {},
  });
  await writeFile(path.join(root, 'jobs', 'src.json'), JSON.stringify(record('src', 'source', 'finishing', ['preparing', 'prepared', 'streaming', 'stream-completed', 'finishing'])));
  await writeFile(path.join(root, 'jobs', 'dst.json'), JSON.stringify(record('dst', 'destination', 'finishing', ['preparing', 'prepared', 'receiving', 'received', 'finishing'])));
  const store = new StateStore(root);
  await store.init();
  t.teardown(() => store.close());
  const jobs = new JobRegistry(store, 10);
  await jobs.load();
  t.equal(jobs.require('src').record.phase, 'asking-outcome');
  t.same(jobs.require('src').record.phaseHistory.map((h) => h.phase), ['preparing', 'prepared', 'streaming', 'stream-completed', 'asking-outcome']);
  t.equal(jobs.require('dst').record.phase, 'taking-over');
  t.same(jobs.require('dst').record.phaseHistory.map((h) => h.phase), ['starting-incoming', 'listening', 'receiving', 'received', 'taking-over']);
});
