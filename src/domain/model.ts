/**
 * The validated domain model. `parseDomainXml` returns it *completed*: defaults filled in,
 * implicit controllers added, every device given its address and id. `buildArgv` is then a
 * plain translation, so the argv depends on nothing but this model and the host settings.
 */

export type DomainType = 'kvm' | 'qemu';
export type Accel = 'kvm' | 'tcg';
/** Chipset of the machine type: decides the PCI root bus name and the builtin controllers. */
export type MachineFamily = 'i440fx' | 'q35';

export interface PciAddress {
  type: 'pci';
  domain: number;
  bus: number;
  slot: number;
  function: number;
  multifunction: boolean;
}
export interface DriveAddress {
  type: 'drive';
  controller: number;
  bus: number;
  target: number;
  unit: number;
}
export interface UsbAddress {
  type: 'usb';
  bus: number;
  port: number;
}
export interface VirtioSerialAddress {
  type: 'virtio-serial';
  controller: number;
  bus: number;
  port: number;
}
export type DeviceAddress = PciAddress | DriveAddress | UsbAddress | VirtioSerialAddress;

export type BootDev = 'hd' | 'cdrom' | 'network';

export interface OsDef {
  arch: 'x86_64';
  bootDevs: BootDev[];
  bootMenu?: { enable: boolean; timeoutMs?: number };
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  /** `<os firmware>`: efi is chosen at define from the host's firmware descriptors (see selectFirmware). */
  firmware?: 'efi' | 'bios';
  /** `<firmware><feature>`: what the chosen firmware must (true) or must not (false) have. */
  firmwareFeatures?: Partial<Record<FirmwareFeature, boolean>>;
  loader?: LoaderDef;
  nvram?: NvramDef;
}

/** The firmware features a domain may ask for by name (libvirt's `<firmware><feature>`). */
export const FIRMWARE_FEATURES = ['enrolled-keys', 'secure-boot'] as const;
export type FirmwareFeature = (typeof FIRMWARE_FEATURES)[number];

export interface LoaderDef {
  /** Absent until the firmware is chosen (`<os firmware='efi'>` without a path). */
  path?: string;
  /** pflash: the code on flash unit 0 (the vars on unit 1); rom: loaded as the BIOS (-bios). */
  type: 'pflash' | 'rom';
  readonly: boolean;
  /** The flash is writable only from SMM (cfi.pflash01 secure=on): what Secure Boot relies on. */
  secure: boolean;
}

/** The UEFI variable store: this domain's own file, made from `template` when it does not exist. */
export interface NvramDef {
  /**
   * The file the XML names. Absent: the agent keeps the store in its own state directory, one
   * per domain (a migration destination makes its own from the template).
   */
  path?: string;
  template?: string;
}

/** One of qemu's firmware descriptors (docs/interop/firmware.json), as far as x86_64 needs it. */
export interface FirmwareDescriptor {
  /** The descriptor's own file, for messages. */
  file: string;
  interfaceTypes: string[];
  device: 'flash' | 'memory';
  executable: string;
  nvramTemplate?: string;
  /** Machine type globs for x86_64 (e.g. `pc-q35-*`). */
  machines: string[];
  features: string[];
}

export type CpuMode = 'custom' | 'host-model' | 'host-passthrough' | 'maximum';
export type CpuFeaturePolicy = 'require' | 'force' | 'disable' | 'forbid' | 'optional';
export interface CpuDef {
  mode: CpuMode;
  /** qemu model name (custom mode only). */
  model?: string;
  fallback?: 'allow' | 'forbid';
  match?: 'exact' | 'strict';
  check?: 'none' | 'partial' | 'full';
  /** `name` is qemu's spelling (libvirt aliases such as pclmuldq are translated). */
  features: { name: string; policy: CpuFeaturePolicy }[];
  /** `dies` is 1 unless given (libvirt's default, always on -smp for qemu 7.2). */
  topology?: { sockets: number; dies: number; cores: number; threads: number };
  /** host-passthrough/maximum: `migratable=on|off` on -cpu (libvirt's default for them is on). */
  migratable?: boolean;
  /** Guest NUMA cells, in id order (ids are 0..n-1). */
  numa?: NumaCell[];
  /** custom: `<vendor>` the host's CPU must have (libvirt's check; no argv). */
  vendor?: 'Intel' | 'AMD';
}

export interface NumaCell {
  id: number;
  /** The vCPUs of the cell, ascending. */
  cpus: number[];
  memoryKiB: number;
}

/** The Hyper-V enlightenments libvirt knows, in the order libvirt puts them on the -cpu line. */
export const HYPERV_FEATURES = ['relaxed', 'vapic', 'spinlocks', 'vpindex', 'runtime', 'synic', 'stimer', 'reset', 'vendor_id',
  'frequencies', 'reenlightenment', 'tlbflush', 'ipi', 'evmcs'] as const;
export type HypervFeature = (typeof HYPERV_FEATURES)[number];

export interface HypervDef {
  /** Each feature the XML names, on or off (absent: qemu's default, off). */
  features: Partial<Record<HypervFeature, boolean>>;
  /** spinlocks: how often a guest spins before it tells the hypervisor (`retries`, at least 4095). */
  spinlockRetries?: number;
  /** vendor_id: the vendor string the guest reads (up to 12 characters). */
  vendorId?: string;
  /** stimer `<direct state='on'/>`: synthetic timers delivered directly. */
  stimerDirect?: boolean;
}

export interface FeaturesDef {
  acpi: boolean;
  apic: boolean;
  pae: boolean;
  vmport?: boolean;
  /** `<smm state>`: System Management Mode (q35); tseg, its extended TSEG size in MiB. */
  smm?: { on: boolean; tsegMiB?: number };
  /** `<hyperv mode='custom'>`: what Windows guests from virt-manager carry. */
  hyperv?: HypervDef;
}

export interface ClockDef {
  offset: 'utc' | 'localtime';
  rtcTickPolicy?: 'catchup' | 'delay';
  /** `-rtc clock=`: guest = vm, wall = host, realtime = rt. */
  rtcTrack?: 'guest' | 'wall' | 'realtime';
  /** A `<timer name='pit'>` is listed: libvirt then always passes kvm-pit.lost_tick_policy (delay unless discard). */
  pit?: boolean;
  pitTickPolicy?: 'delay' | 'discard';
  hpet?: boolean;
  /** `kvmclock=on|off` on -cpu. */
  kvmclock?: boolean;
  /** The hypervclock timer: `hv-time=on|off` on -cpu. */
  hypervclock?: boolean;
  /** `tsc-frequency=` on -cpu, in Hz. */
  tscFrequency?: number;
}

export interface PmDef {
  /** suspend-to-mem enabled: `disable_s3=0`; disabled: `=1`; absent: qemu's default. */
  s3?: boolean;
  s4?: boolean;
}

export type WatchdogModel = 'itco' | 'i6300esb' | 'ib700';
export type WatchdogAction = 'reset' | 'shutdown' | 'poweroff' | 'pause' | 'none' | 'inject-nmi';
export interface WatchdogDef {
  element: string;
  model: WatchdogModel;
  /** i6300esb only. */
  address?: PciAddress;
  /** watchdog0, watchdog1 ... in document order (itco has none on the command line). */
  id: string;
}

export interface SysinfoDef {
  /** Each table as [qemu key, value] in libvirt's key order; absent tables are not passed. */
  bios?: [string, string][];
  system?: [string, string][];
  baseBoard?: [string, string][];
  chassis?: [string, string][];
  oemStrings?: string[];
}

export interface AudioDef {
  element: string;
  /** `<audio id>`: the qemu id is audioN. */
  id: number;
  /** none: qemu's null backend; spice: the sound goes to the SPICE client (needs a SPICE display). */
  type: 'none' | 'spice';
}

/** `<sound>`: an HDA controller (ich9, ich6) with its codecs, or an AC97; it plays into an `<audio>` backend. */
export interface SoundDef {
  element: string;
  model: 'ich9' | 'ich6' | 'ac97';
  /** HDA codecs, in order (libvirt: one duplex when none is given). */
  codecs: Array<'duplex' | 'micro' | 'output'>;
  /** `<audio id>` it plays into; else the first backend. */
  audioId?: number;
  address?: PciAddress;
  id: string;
}

export interface CpuTuneDef {
  /** `<vcpu cpuset>`: host CPUs of every vCPU without a vcpupin (and of the emulator without an emulatorpin). */
  cpuset?: number[];
  vcpupin: { vcpu: number; cpus: number[] }[];
  emulatorpin?: number[];
}

export type CacheMode = 'none' | 'writethrough' | 'writeback' | 'directsync' | 'unsafe';
export type DiskBus = 'virtio' | 'ide' | 'sata' | 'scsi';

export interface DiskDef {
  /** Path of the element in the XML, e.g. `/domain/devices/disk[1]`. */
  element: string;
  type: 'file' | 'block';
  device: 'disk' | 'cdrom';
  format: 'raw' | 'qcow2';
  cache?: CacheMode;
  io?: 'threads' | 'native';
  discard?: 'ignore' | 'unmap';
  /** Absent only for a cdrom with an empty tray. */
  source?: string;
  target: string;
  bus: DiskBus;
  readonly: boolean;
  shareable: boolean;
  serial?: string;
  /** `<wwn>`: 16 hex digits, lower case, without 0x (IDE and SCSI disks only, as libvirt). */
  wwn?: string;
  /** virtio: `<driver iothread='K'>`, the iothreadK object. */
  iothread?: number;
  bootOrder?: number;
  /** Effective qemu bootindex, from `<boot order>` or the `<os><boot dev>` list. */
  bootIndex?: number;
  address: PciAddress | DriveAddress;
  /** qemu device id in libvirt's style: virtio-disk0, ide0-0-0, sata0-0-1, scsi0-0-0-0 (lsilogic: scsi0-0-0). */
  id: string;
}

export type ControllerType = 'usb' | 'ide' | 'sata' | 'scsi' | 'virtio-serial' | 'pci';
/** PCI controllers: the root of each chipset, root ports and bridges (each of index N provides bus N). */
export type PciModel = 'pci-root' | 'pcie-root' | 'pcie-root-port' | 'pcie-to-pci-bridge' | 'dmi-to-pci-bridge' | 'pci-bridge'
  | 'pcie-switch-upstream-port' | 'pcie-switch-downstream-port' | 'pci-expander-bus' | 'pcie-expander-bus';

export interface ControllerDef {
  /** Absent for a controller that was added implicitly (a device needed it). */
  element?: string;
  type: ControllerType;
  index: number;
  model?: UsbModel | 'virtio-scsi' | 'lsilogic' | PciModel;
  /**
   * pcie-root-port: its chassis and port numbers (libvirt: the index, and slot << 3 | function);
   * pcie-switch-downstream-port: the same (libvirt: the index, and its slot).
   */
  chassis?: number;
  port?: number;
  /** pci-bridge: its chassis_nr (libvirt: the index). */
  chassisNr?: number;
  /** pci-expander-bus, pcie-expander-bus: the bus number it starts at (libvirt: 254, 252, ... down from 256). */
  busNr?: number;
  /** Provided by the machine type itself: nothing on the command line. */
  builtin: boolean;
  /** usb (qemu-xhci, nec-xhci): USB 2 and USB 3 ports each (p2/p3); virtio-serial: max_ports. */
  ports?: number;
  /** virtio-serial: MSI-X vectors. */
  vectors?: number;
  /** virtio-scsi `<driver queues>`: num_queues. */
  queues?: number;
  /** virtio-scsi `<driver iothread='K'>`: the controller's requests run in iothreadK. */
  iothread?: number;
  /** An ICH9 UHCI companion of the EHCI with the same index: its first port there (masterbus/firstport). */
  master?: { startport: number };
  address?: PciAddress;
  /** qemu id; buses hang below it (`usb.0`, `sata1.3`, `scsi0.0`, `virtio-serial0.0`). '' for a USB companion (no id, as libvirt). */
  id: string;
}

export type UsbModel = 'none' | 'piix3-uhci' | 'qemu-xhci' | 'nec-xhci' | 'ich9-ehci1' | 'ich9-uhci1' | 'ich9-uhci2' | 'ich9-uhci3';

/** The pvpanic ISA device (`<panic model='isa'>`); `ioport` when the XML gives its iobase. */
export interface PanicDef {
  element: string;
  ioport?: number;
}

/**
 * `<tpm>` with an emulator backend: a TPM that swtpm emulates (its state in the agent's state
 * directory), reached by qemu over swtpm's control socket. qemu carries the TPM's state in the
 * migration stream, so it migrates without shared storage; a host's own TPM (passthrough) would not.
 */
export interface TpmDef {
  element: string;
  model: TpmModel;
  version: TpmVersion;
  /** `<active_pcr_banks>`: the PCR banks swtpm_setup activates; absent: swtpm_setup's default. */
  activePcrBanks?: TpmPcrBank[];
}

export type TpmModel = 'tpm-tis' | 'tpm-crb';
export type TpmVersion = '1.2' | '2.0';
export const TPM_PCR_BANKS = ['sha1', 'sha256', 'sha384', 'sha512'] as const;
export type TpmPcrBank = (typeof TPM_PCR_BANKS)[number];

export interface InterfaceDef {
  element: string;
  /**
   * bridge and network: a tap the agent creates and attaches to the bridge (a network's bridge
   * is the host's --network mapping); ethernet: a tap that exists already (`targetDev`).
   */
  type: 'user' | 'bridge' | 'network' | 'ethernet';
  mac: string;
  model: 'virtio' | 'e1000' | 'e1000e' | 'rtl8139';
  bridge?: string;
  /** type network: the libvirt network's name (`<source network>`), resolved by the host. */
  network?: string;
  /** ethernet: the existing tap; bridge/network: the name the tap the agent creates is to have. */
  targetDev?: string;
  /** `<mtu size>`: the tap's MTU; a virtio NIC is told it (host_mtu). */
  mtu?: number;
  bootOrder?: number;
  bootIndex?: number;
  address: PciAddress;
  id: string;
  netdevId: string;
}

export type CharSource =
  | { type: 'pty' }
  | { type: 'null' }
  | { type: 'file'; path: string; append?: boolean }
  | { type: 'unix'; mode: 'bind' | 'connect'; path: string }
  /** A virtio channel's listening socket with no path: the host puts it in the guest's own run directory. */
  | { type: 'unix'; mode: 'bind'; path?: undefined }
  | { type: 'tcp'; mode: 'bind' | 'connect'; host: string; service: number; protocol: 'raw' | 'telnet' }
  /** The SPICE display's agent channel (vdagent): a channel of the SPICE client's, no host file or socket. */
  | { type: 'spicevmc' };

export interface CharLog {
  file: string;
  append?: boolean;
}

export interface SerialDef {
  element: string;
  /** 'console' when a serial-type console with no `<serial>` became the serial port. */
  origin: 'serial' | 'console';
  source: CharSource;
  log?: CharLog;
  port: number;
  id: string;
  chardevId: string;
}

/** A virtio console (virtconsole). Serial-type consoles are folded into `serials`. */
export interface ConsoleDef {
  element: string;
  source: CharSource;
  log?: CharLog;
  address: VirtioSerialAddress;
  id: string;
  chardevId: string;
}

export interface ChannelDef {
  element: string;
  source: CharSource;
  log?: CharLog;
  name: string;
  address: VirtioSerialAddress;
  id: string;
  chardevId: string;
}

export interface VncGraphicsDef {
  element: string;
  type: 'vnc';
  listen: string;
  autoport: boolean;
  /** TCP port (>= 5900) when not autoport. */
  port?: number;
}

/** A SPICE display, without TLS and without a password (as a VNC one here). */
export interface SpiceGraphicsDef {
  element: string;
  type: 'spice';
  /** The address it listens on; absent for `<listen type='none'/>`: no listening socket at all. */
  listen?: string;
  /** The host chooses the port at each start (HostSettings.spicePort), as libvirt does from 5900 up. */
  autoport: boolean;
  /** TCP port when not autoport. */
  port?: number;
  /** `<mouse mode>`: client is the agent's absolute pointer (agent-mouse=on), server qemu's own. */
  mouseMode?: 'server' | 'client';
  /** defaultMode='insecure': every channel on the plain port (plaintext-channel=default). */
  plaintextDefault: boolean;
  /** Compression and streaming of the SPICE server, as [qemu key, value] in libvirt's key order. */
  compression: [string, string][];
  /** `<clipboard copypaste>` and `<filetransfer enable>`: what the client's agent may do (both on unless 'no'). */
  copyPaste: boolean;
  fileTransfer: boolean;
}

export type GraphicsDef = VncGraphicsDef | SpiceGraphicsDef;

export interface VideoDef {
  /** Absent for the VGA added implicitly for `<graphics>`. */
  element?: string;
  model: 'vga' | 'cirrus' | 'qxl' | 'virtio' | 'bochs' | 'none';
  /** vga and bochs: passed on (vgamem_mb, vgamem); cirrus: kept in the XML, not passed (as libvirt); qxl: vram_size. */
  vramKiB?: number;
  /** qxl (libvirt's defaults filled in): ram_size, vram64_size_mb (0 when not given, as libvirt), vgamem_mb. */
  qxl?: { ramKiB: number; vram64KiB: number; vgamemKiB: number };
  /** qxl and virtio: max_outputs (libvirt's default 1). */
  heads?: number;
  /** The first video: qemu's VGA-compatible variant (qxl-vga, virtio-vga); the others are plain PCI displays (qxl, virtio-gpu-pci). */
  primary: boolean;
  address?: PciAddress;
  id: string;
}

/** `<redirdev bus='usb' type='spicevmc'>`: a USB device of the SPICE client's, plugged into the guest (usb-redir). */
export interface RedirdevDef {
  element: string;
  address: UsbAddress;
  id: string;
  chardevId: string;
}

export interface InputDef {
  element: string;
  type: 'tablet' | 'mouse' | 'keyboard';
  bus: 'usb' | 'ps2' | 'virtio';
  address?: PciAddress | UsbAddress;
  id: string;
}

export interface MemballoonDef {
  element: string;
  model: 'virtio' | 'none';
  /** `<stats period>` in seconds: set over QMP after start (guest-stats-polling-interval), not argv. */
  statsPeriod?: number;
  address?: PciAddress;
  id: string;
}

export interface RngDef {
  element: string;
  model: 'virtio';
  backend: '/dev/random' | '/dev/urandom';
  rate?: { bytes: number; periodMs?: number };
  address: PciAddress;
  id: string;
  objectId: string;
}

export interface DomainDef {
  type: DomainType;
  name: string;
  /** Canonical form: lower case, hyphenated. */
  uuid: string;
  title?: string;
  description?: string;
  /** The `<metadata>` children, serialized; never interpreted. */
  metadata?: string;
  memoryKiB: number;
  currentMemoryKiB: number;
  /** Maximum vcpus (`<vcpu>`); `vcpusCurrent` are online at start. */
  vcpus: number;
  vcpusCurrent: number;
  machine: string;
  machineFamily: MachineFamily;
  os: OsDef;
  cpu?: CpuDef;
  features: FeaturesDef;
  clock: ClockDef;
  onPoweroff: 'destroy' | 'preserve';
  onReboot: 'restart' | 'destroy';
  /** restart: the agent resets the guest on GUEST_PANICKED and lets it run on (libvirt's fake reboot). */
  onCrash: 'destroy' | 'preserve' | 'restart';
  pm?: PmDef;
  /** `<os><smbios mode='sysinfo'/>` with a `<sysinfo type='smbios'>`: the tables passed as -smbios. */
  smbios?: SysinfoDef;
  /** Guest RAM from hugetlbfs (memory-backend-file under the host's mount). */
  hugepages?: boolean;
  /** `<iothreads>`: iothread1..N. */
  iothreads: number;
  cputune?: CpuTuneDef;
  emulator?: string;
  disks: DiskDef[];
  controllers: ControllerDef[];
  interfaces: InterfaceDef[];
  serials: SerialDef[];
  consoles: ConsoleDef[];
  channels: ChannelDef[];
  graphics: GraphicsDef[];
  videos: VideoDef[];
  inputs: InputDef[];
  redirdevs: RedirdevDef[];
  memballoon?: MemballoonDef;
  panic?: PanicDef;
  tpm?: TpmDef;
  rngs: RngDef[];
  watchdogs: WatchdogDef[];
  /** The action of every watchdog (qemu has one for all). */
  watchdogAction?: WatchdogAction;
  audios: AudioDef[];
  sounds: SoundDef[];
}

export interface FileRef {
  kind: 'disk' | 'kernel' | 'initrd' | 'loader' | 'nvram' | 'nvram-template' | 'serial' | 'console' | 'channel' | 'log';
  path: string;
  /** Path of the XML element or attribute that names the file. */
  element: string;
  /** false: qemu creates it (output files, listening sockets); its directory must exist. */
  mustExist: boolean;
  /** Disks only: the image format, whose header may name further files (qcow2 backing chain). */
  format?: 'raw' | 'qcow2';
  /** qemu writes (or creates) it: no other domain may name it too. */
  writes: boolean;
  /** A disk marked <shareable/>: other shareable disks may name the same file. */
  shareable?: boolean;
  /** A unix socket qemu listens on: qemu unlinks whatever is at the path first. */
  listens?: boolean;
  /** An output file qemu appends to (append='on'); otherwise it truncates it. */
  append?: boolean;
  /** qemu opens it through qemu_open, so it can be handed a descriptor instead of the path. */
  passable?: boolean;
  /** qemu reads it whole by name (fopen, not qemu_open): handed a descriptor as /proc/self/fd/M. */
  loadsWhole?: boolean;
  /** Firmware: read-only, it may also be one of the host's own firmware files (qemu's firmware descriptors name them). */
  firmware?: boolean;
}

export interface NormalizeHost {
  /** e.g. { pc: 'pc-i440fx-7.2', q35: 'pc-q35-7.2' } */
  machineAliases: Record<string, string>;
  knownMachines: string[];
  /** qemu's firmware descriptors on this host, in priority order: `<os firmware='efi'>` picks from them. */
  firmwares: FirmwareDescriptor[];
  randomBytes: (n: number) => Buffer;
}

export interface HostSettings {
  qemuBinary: string;
  accel: Accel;
  qmpSocketPath: string;
  pidfilePath: string;
  /** Where the listening socket of a virtio channel without a `<source path>` goes (by channel id); needed for such a channel. */
  channelSocketPath?: (channelId: string) => string;
  /** The tap the host made for an interface of type bridge or network (by interface id); needed for such an interface. */
  tapName?: (interfaceId: string) => string;
  /**
   * What qemu is told for a guest file it opens through qemu_open (disks, chardev files and
   * logs): the path itself, or `/dev/fdset/N` for a descriptor the agent opened and checked.
   */
  fileArg?: (path: string) => string;
  /**
   * The files a qcow2 disk's header names, opened by the agent: qemu gets each as a node of its
   * own and opens none by the name it would read from a header. Absent: qemu follows the header.
   */
  imageChain?: (source: string) => ImageChain | undefined;
  /**
   * The directory on the host's hugetlbfs mount where qemu creates the guest's RAM file
   * (`<memoryBacking><hugepages/>`); the agent checks the mount and its free pages first.
   */
  hugepagesPath?: string;
  /** The UEFI variable store of a domain whose `<nvram>` names no file (the host keeps one per domain). */
  nvramPath?: string;
  /** swtpm's control socket, for a domain with a `<tpm>` (the agent starts swtpm before qemu). */
  tpmSocketPath?: string;
  /** The port the host chose for an autoport SPICE display that listens; needed for one. */
  spicePort?: number;
}

/** What qemu is told for the files below a qcow2 image (fileArg's form of each). */
export interface ImageChain {
  /** The image's external data file. */
  dataFile?: string;
  /** Its backing file, that one's backing file, and so on to the end of the chain. */
  backing: Array<{ file: string; format: 'raw' | 'qcow2'; dataFile?: string }>;
}

export interface ArgvOptions {
  /** Add `-incoming defer` (the destination of a migration). */
  incoming?: boolean;
}
