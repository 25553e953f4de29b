/**
 * Domain XML for the project's test guest: its raw boot disk (IDE on pc, SATA on q35, which has
 * no IDE) and its serial log (appended).
 */
export function testGuestXml(o: { name: string; image: string; serialLog: string; memoryMiB: number; uuid?: string; vcpus?: number; machine?: 'pc' | 'q35' }): string {
  const q35 = o.machine === 'q35';
  return `<domain type='kvm'>
  <name>${o.name}</name>${o.uuid ? `\n  <uuid>${o.uuid}</uuid>` : ''}
  <memory unit='MiB'>${o.memoryMiB}</memory>
  <vcpu>${o.vcpus ?? 1}</vcpu>
  <os>
    <type arch='x86_64' machine='${q35 ? 'q35' : 'pc'}'>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${o.image}'/>
      <target dev='${q35 ? 'sda' : 'hda'}' bus='${q35 ? 'sata' : 'ide'}'/>
    </disk>
    <serial type='file'>
      <source path='${o.serialLog}' append='on'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
`;
}
