/**
 * Domain XML built to cost the parser the most per byte, each shape filled up to a size (the
 * define cap, or Prepare2's twice that): what bench/xml-parse.ts measures and what the agent
 * tests send to see the event loop stay free.
 */

const HEAD = `<name>worst</name><uuid>8f0e4d2c-6b1a-4c3e-9d5f-7a8b9c0d1e2f</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>` +
  `<os><type arch='x86_64' machine='pc'>hvm</type></os>`;

/** `unit` repeated inside `<domain>` (at `where`) for as long as the document stays within `bytes`. */
function fill(bytes: number, where: 'metadata' | 'description' | 'devices', unit: (i: number) => string): string {
  const [open, close] = where === 'metadata' ? ["<metadata><w:m xmlns:w='urn:worst'>", '</w:m></metadata><devices/>']
    : where === 'description' ? ['<description>', '</description><devices/>']
      : ['<devices>', '</devices>'];
  const frame = `<domain type='kvm'>${HEAD}${open}`;
  const end = `${close}</domain>`;
  const parts: string[] = [];
  let size = Buffer.byteLength(frame + end);
  // Bounded: every unit is at least one byte.
  for (let i = 0; i < bytes; i++) {
    const u = unit(i);
    const n = Buffer.byteLength(u);
    if (size + n > bytes) break;
    parts.push(u);
    size += n;
  }
  return frame + parts.join('') + end;
}

/** vda, vdb, ..., vdaa: the names a disk target may have. */
function diskLetters(i: number): string {
  let s = '';
  for (let n = i + 1; n > 0; n = Math.floor((n - 1) / 26)) s = String.fromCharCode(97 + ((n - 1) % 26)) + s;
  return s;
}

const DEPTH = 90; // fast-xml-parser refuses more than 100 nested tags; metadata already sits 3 deep

export const WORST_SHAPES: Record<string, (bytes: number) => string> = {
  /** Small elements, each a node of the tree: the most nodes per byte. */
  'many-elements': (bytes) => fill(bytes, 'metadata', () => '<w:e/>'),
  /** Elements with many short attributes (each decoded, stored in a Map, serialized again). */
  'many-attributes': (bytes) => fill(bytes, 'metadata', (i) => `<w:e ${Array.from({ length: 16 }, (_, k) => `a${k}='${i % 10}'`).join(' ')}/>`),
  /** Chains nested close to the parser's depth limit, repeated. */
  'deep-nesting': (bytes) => fill(bytes, 'metadata', () => `${'<w:d>'.repeat(DEPTH)}x${'</w:d>'.repeat(DEPTH)}`),
  /** One long description made of character references. */
  'long-description': (bytes) => fill(bytes, 'description', (i) => (i % 2 ? '&#x41;' : '&amp;')),
  /** Device elements the walk checks one by one (refused in the end: more disks than any bus holds). */
  'many-devices': (bytes) => fill(bytes, 'devices', (i) => `<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/var/lib/img/d${i}.img'/><target dev='vd${diskLetters(i)}' bus='virtio'/></disk>`),
  /** Comments, kept in the tree and written back. */
  'many-comments': (bytes) => fill(bytes, 'metadata', () => '<!--c-->'),
};
