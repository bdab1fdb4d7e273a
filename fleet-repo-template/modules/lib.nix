# Pure helpers of the reup NixOS modules (minify.nix), written with builtins only: no nixpkgs, so
# that they evaluate offline (the reup repository's tests/integration/test_nix_files.py checks them on
# hosts/board.lsmod with plain `nix-instantiate --eval`).
#
#   parseLsmod TEXT          -> sorted, unique kernel module names ("-" read as "_")
#   configFor TABLE MODULES  -> { mapped; unmapped; settings = { SYMBOL = "y" | "m"; }; }
#   mergeSettings [ SETS ]   -> one symbol set; "y" beats "m" beats anything else
#   moduleConfig             -> the table: module name -> the Kconfig symbols that build it
#   nixosBaseline            -> symbols a NixOS system needs whatever lsmod says
#   smallSystemd             -> the `systemd.override` flags of reup.minify.systemd
#
# Kernel symbol values are strings as in a .config: "y", "m", "n" or a freeform value;
# minify.nix turns them into nixpkgs' lib.kernel values.
let
  # Module names are spelt with "-" or "_" interchangeably; lsmod and /proc/modules print "_".
  normalize = builtins.replaceStrings [ "-" ] [ "_" ];

  uniqueSorted = list:
    builtins.attrNames (builtins.listToAttrs (map (name: { inherit name; value = null; }) list));

  lines = text: builtins.filter builtins.isString (builtins.split "\n" text);

  # The first word of a line, when it can be a module name ("#" comments and blank lines: null).
  firstWord = line:
    let m = builtins.match "[[:space:]]*([A-Za-z0-9_-]+)([[:space:]].*)?" line;
    in if m == null then null else builtins.head m;

  # Works on `lsmod` output (header "Module Size Used by") and on /proc/modules (no header).
  parseLsmod = text:
    uniqueSorted (map normalize
      (builtins.filter (w: w != null && w != "Module") (map firstWord (lines text))));

  rank = v: if v == "y" then 2 else if v == "m" then 1 else 0;

  mergeSettings = builtins.foldl'
    (acc: set: acc // builtins.mapAttrs
      (symbol: value: if acc ? ${symbol} && rank acc.${symbol} >= rank value then acc.${symbol} else value)
      set)
    { };

  configFor = table: modules:
    let
      names = uniqueSorted (map normalize modules);
      mapped = builtins.filter (m: table ? ${m}) names;
    in {
      inherit mapped;
      unmapped = builtins.filter (m: !(table ? ${m})) names;
      settings = mergeSettings (map (m: table.${m}) mapped);
    };

  m = symbol: { ${symbol} = "m"; };

  # What builds each module, in the spirit of `make localmodconfig` (which reads the kernel's
  # Makefiles; there is no kernel source here, so this is a table). A module maps to the
  # user-visible symbol that builds it, plus the menus ("y") it sits under; `{ }` marks helper
  # modules (mbcache, jbd2, nvme_core, ...) that the symbols of their users select. A loaded
  # module missing from this table is reported by reup.minify.kernel.unmappedModules and a
  # warning; add it with reup.minify.kernel.moduleConfig.
  netfilter = { NETFILTER = "y"; NETFILTER_ADVANCED = "y"; };
  ethernet = vendor: { NETDEVICES = "y"; ETHERNET = "y"; ${vendor} = "y"; };
  hwmon = symbol: { HWMON = "y"; ${symbol} = "m"; };
  usbSerial = symbol: { USB_SERIAL = "m"; ${symbol} = "m"; };
  moduleConfig = {
    # file systems and block devices
    ext4 = m "EXT4_FS";
    jbd2 = { };
    mbcache = { };
    crc16 = { };
    vfat = m "VFAT_FS";
    fat = { };
    nls_cp437 = m "NLS_CODEPAGE_437";
    nls_iso8859_1 = m "NLS_ISO8859_1";
    nls_ascii = m "NLS_ASCII";
    overlay = m "OVERLAY_FS";
    erofs = m "EROFS_FS";
    squashfs = m "SQUASHFS";
    fuse = m "FUSE_FS";
    configfs = m "CONFIGFS_FS";
    autofs4 = m "AUTOFS_FS";
    efivarfs = m "EFIVAR_FS";
    efi_pstore = m "EFI_VARS_PSTORE";
    loop = { BLK_DEV = "y"; BLK_DEV_LOOP = "m"; };
    dm_mod = { MD = "y"; BLK_DEV_DM = "m"; };
    nvme = m "BLK_DEV_NVME";
    nvme_core = { };
    mmc_block = m "MMC_BLOCK";
    sdhci = m "MMC_SDHCI";
    sdhci_pltfm = m "MMC_SDHCI_PLTFM";
    sdhci_iproc = { MMC_SDHCI_PLTFM = "m"; MMC_SDHCI_IPROC = "m"; };
    scsi_mod = m "SCSI";
    sd_mod = { SCSI = "y"; BLK_DEV_SD = "m"; };
    libata = m "ATA";
    libahci = { };
    ahci = { ATA = "m"; SATA_AHCI = "m"; };
    usb_storage = m "USB_STORAGE";
    uas = { USB_STORAGE = "m"; USB_UAS = "m"; };
    virtio_blk = m "VIRTIO_BLK";
    virtio_scsi = m "SCSI_VIRTIO";

    # USB, HID, input
    usbcore = m "USB";
    usb_common = { };
    xhci_hcd = { USB_SUPPORT = "y"; USB_XHCI_HCD = "m"; };
    xhci_pci = { USB_SUPPORT = "y"; USB_XHCI_HCD = "m"; USB_XHCI_PCI = "m"; };
    ehci_hcd = m "USB_EHCI_HCD";
    ehci_pci = m "USB_EHCI_PCI";
    dwc2 = m "USB_DWC2";
    roles = m "USB_ROLE_SWITCH";
    hid = m "HID";
    hid_generic = m "HID_GENERIC";
    usbhid = { HID = "m"; USB_HID = "m"; };
    evdev = m "INPUT_EVDEV";
    button = m "ACPI_BUTTON";
    usbserial = m "USB_SERIAL";
    cdc_acm = m "USB_ACM";
    ftdi_sio = usbSerial "USB_SERIAL_FTDI_SIO";
    cp210x = usbSerial "USB_SERIAL_CP210X";
    ch341 = usbSerial "USB_SERIAL_CH341";
    pl2303 = usbSerial "USB_SERIAL_PL2303";

    # networking
    igb = ethernet "NET_VENDOR_INTEL" // { IGB = "m"; };
    e1000 = ethernet "NET_VENDOR_INTEL" // { E1000 = "m"; };
    e1000e = ethernet "NET_VENDOR_INTEL" // { E1000E = "m"; };
    r8169 = ethernet "NET_VENDOR_REALTEK" // { R8169 = "m"; };
    realtek = m "REALTEK_PHY";
    bcmgenet = ethernet "NET_VENDOR_BROADCOM" // { BCMGENET = "m"; };
    broadcom = m "BROADCOM_PHY";
    bcm_phy_lib = { };
    virtio_net = m "VIRTIO_NET";
    dca = m "DCA";
    ptp = m "PTP_1588_CLOCK";
    pps_core = m "PPS";
    cfg80211 = { WIRELESS = "y"; CFG80211 = "m"; };
    rfkill = m "RFKILL";
    brcmfmac = { WLAN = "y"; WLAN_VENDOR_BROADCOM = "y"; BRCMFMAC = "m"; BRCMFMAC_SDIO = "y"; };
    brcmutil = { };
    bridge = m "BRIDGE";
    "8021q" = m "VLAN_8021Q";
    tun = m "TUN";
    veth = m "VETH";
    wireguard = m "WIREGUARD";
    ipv6 = m "IPV6";
    af_packet = m "PACKET";
    tcp_bbr = m "TCP_CONG_BBR";
    sch_fq_codel = m "NET_SCH_FQ_CODEL";

    # netfilter (the NixOS firewall: iptables over nf_tables, reverse-path filter, logging)
    x_tables = netfilter // { NETFILTER_XTABLES = "m"; };
    xt_tcpudp = { };
    xt_conntrack = netfilter // { NETFILTER_XT_MATCH_CONNTRACK = "m"; };
    xt_pkttype = netfilter // { NETFILTER_XT_MATCH_PKTTYPE = "m"; };
    xt_LOG = netfilter // { NETFILTER_XT_TARGET_LOG = "m"; };
    xt_MASQUERADE = netfilter // { NETFILTER_XT_TARGET_MASQUERADE = "m"; };
    nf_log_syslog = netfilter // { NF_LOG_SYSLOG = "m"; };
    nf_conntrack = netfilter // { NF_CONNTRACK = "m"; };
    nf_defrag_ipv4 = { };
    nf_defrag_ipv6 = { };
    nf_nat = netfilter // { NF_NAT = "m"; };
    nf_tables = netfilter // { NF_TABLES = "m"; NF_TABLES_INET = "y"; NF_TABLES_IPV4 = "y"; NF_TABLES_IPV6 = "y"; };
    nft_compat = netfilter // { NFT_COMPAT = "m"; };
    nfnetlink = { };
    libcrc32c = { };
    ip_tables = netfilter // { IP_NF_IPTABLES = "m"; };
    ip6_tables = netfilter // { IP6_NF_IPTABLES = "m"; };
    iptable_filter = netfilter // { IP_NF_IPTABLES = "m"; IP_NF_FILTER = "m"; };
    ip6table_filter = netfilter // { IP6_NF_IPTABLES = "m"; IP6_NF_FILTER = "m"; };
    iptable_nat = netfilter // { IP_NF_IPTABLES = "m"; IP_NF_NAT = "m"; };
    ipt_rpfilter = netfilter // { IP_NF_IPTABLES = "m"; IP_NF_RAW = "m"; IP_NF_MATCH_RPFILTER = "m"; };
    ip6t_rpfilter = netfilter // { IP6_NF_IPTABLES = "m"; IP6_NF_RAW = "m"; IP6_NF_MATCH_RPFILTER = "m"; };

    # x86 platform: sensors, power, watchdog, chipset, TPM, crypto
    coretemp = hwmon "SENSORS_CORETEMP";
    intel_rapl_msr = { POWERCAP = "y"; INTEL_RAPL = "m"; };
    intel_rapl_common = { };
    intel_powerclamp = m "INTEL_POWERCLAMP";
    x86_pkg_temp_thermal = m "X86_PKG_TEMP_THERMAL";
    watchdog = { WATCHDOG = "y"; WATCHDOG_CORE = "m"; };
    iTCO_wdt = { WATCHDOG = "y"; ITCO_WDT = "m"; };
    iTCO_vendor_support = m "ITCO_VENDOR_SUPPORT";
    mei = m "INTEL_MEI";
    mei_me = m "INTEL_MEI_ME";
    lpc_ich = m "LPC_ICH";
    i2c_i801 = m "I2C_I801";
    i2c_smbus = m "I2C_SMBUS";
    i2c_algo_bit = m "I2C_ALGOBIT";
    i2c_dev = m "I2C_CHARDEV";
    tpm = m "TCG_TPM";
    tpm_tis = m "TCG_TIS";
    tpm_tis_core = { };
    tpm_crb = m "TCG_CRB";
    rng_core = m "HW_RANDOM";
    rtc_cmos = m "RTC_DRV_CMOS";
    crc32c_intel = m "CRYPTO_CRC32C_INTEL";
    sha256_ssse3 = m "CRYPTO_SHA256_SSSE3";
    kvm = m "KVM";
    kvm_intel = m "KVM_INTEL";
    kvm_amd = m "KVM_AMD";
    virtio_pci = m "VIRTIO_PCI";

    # Raspberry Pi 4 (BCM2711) with the mainline kernel
    bcm2835_wdt = { WATCHDOG = "y"; BCM2835_WDT = "m"; };
    bcm2711_thermal = m "BCM2711_THERMAL";
    raspberrypi_hwmon = hwmon "SENSORS_RASPBERRYPI_HWMON";
    pcie_brcmstb = m "PCIE_BRCMSTB";
    reset_raspberrypi = m "RESET_RASPBERRYPI";
    clk_raspberrypi = m "CLK_RASPBERRYPI";
    iproc_rng200 = { HW_RANDOM = "m"; HW_RANDOM_IPROC_RNG200 = "m"; };
    bcm2835_rng = { HW_RANDOM = "m"; HW_RANDOM_BCM2835 = "m"; };
    i2c_bcm2835 = m "I2C_BCM2835";
    spi_bcm2835 = m "SPI_BCM2835";
    spidev = m "SPI_SPIDEV";
    pwm_bcm2835 = m "PWM_BCM2835";
    vc4 = { DRM = "m"; DRM_VC4 = "m"; };
    v3d = { DRM = "m"; DRM_V3D = "m"; };
    uio = m "UIO";
    uio_pdrv_genirq = m "UIO_PDRV_GENIRQ";
    wire = m "W1";
    w1_gpio = { W1 = "m"; W1_MASTER_GPIO = "m"; };
  };

  # What a NixOS system needs whatever lsmod shows: modules built into the running kernel never
  # appear in lsmod, and these must be there at boot. The first group is the
  # system.requiredKernelConfig of NixOS's systemd module; /etc as an overlay of an EROFS image
  # (system.etc.overlay, reup.minify.readOnlyEtc) needs the last group.
  nixosBaseline = {
    DEVTMPFS = "y"; CGROUPS = "y"; INOTIFY_USER = "y"; SIGNALFD = "y"; TIMERFD = "y"; EPOLL = "y";
    NET = "y"; SYSFS = "y"; PROC_FS = "y"; FHANDLE = "y"; CRYPTO_USER_API_HASH = "y";
    CRYPTO_HMAC = "y"; CRYPTO_SHA256 = "y"; DMIID = "y"; AUTOFS_FS = "y"; TMPFS_POSIX_ACL = "y";
    TMPFS_XATTR = "y"; SECCOMP = "y";
    BLK_DEV_INITRD = "y"; MODULES = "y"; MODULE_UNLOAD = "y"; BINFMT_ELF = "y"; BINFMT_SCRIPT = "y";
    TMPFS = "y"; UNIX = "y"; INET = "y"; IPV6 = "y"; PACKET = "y";
    BLK_DEV = "y"; BLK_DEV_LOOP = "y"; EROFS_FS = "y"; OVERLAY_FS = "y";
  };

  # `pkgs.systemd.override` flags of reup.minify.systemd: parts of systemd a headless device that
  # reup updates does not run. Every flag exists in nixpkgs' systemd package (nixos-24.11 and
  # later). Left on: cryptsetup/repart/fido2 (the systemd initrd may refer to them), EFI and
  # systemd-boot (the x86 board boots with it), networkd, resolved, timesyncd, logind, sysusers.
  smallSystemd = {
    withHomed = false; # systemd-homed (services.homed)
    withMachined = false; # systemd-machined and machinectl (NixOS containers)
    withImportd = false; # systemd-importd (machinectl pull-*)
    withPortabled = false; # portable services
    withRemote = false; # systemd-journal-remote/-upload (libmicrohttpd, gnutls)
    withTpm2Tss = false; # TPM2 unlock and measurements (tpm2-tss)
    withCoredump = false; # systemd-coredump (elfutils)
    withOomd = false; # systemd-oomd
    withSysupdate = false; # systemd-sysupdate (reup updates the device)
    withVmspawn = false; # systemd-vmspawn
    withApparmor = false; # AppArmor profiles support (libapparmor)
    withQrencode = false; # QR codes of recovery keys (qrencode)
    withPasswordQuality = false; # password quality checks (libpwquality)
    withDocumentation = false; # man pages and HTML documentation
    withShellCompletions = false; # bash/zsh completions
  };
in {
  inherit normalize parseLsmod mergeSettings configFor moduleConfig nixosBaseline smallSystemd;
}
