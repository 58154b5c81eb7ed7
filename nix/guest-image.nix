# A minimal NixOS guest for lightbyte: serial console, the guest agent on vsock port 1024, and
# optionally the load-balancing proxy (for load balancers placed in proxy VMs). Build the disk
# with `nix build .#nixosConfigurations.guest.config.system.build.raw` and push it with
# `lightbyte image push NAME result/nixos.img --format raw`.
{ lightbyte }:
{ config, lib, pkgs, modulesPath, ... }:
{
  imports = [
    "${modulesPath}/profiles/minimal.nix"
    "${modulesPath}/profiles/qemu-guest.nix"
  ];

  options.lightbyte.guest.proxy = lib.mkEnableOption "the lightbyte load-balancing proxy";

  config = {
    boot.kernelParams = [ "console=ttyS0" "reboot=k" "panic=1" "random.trust_cpu=on" ];
    boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_net" "vmw_vsock_virtio_transport" ];
    boot.loader.grub.enable = false;
    fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; };
    networking.useDHCP = false;
    services.getty.autologinUser = null;
    documentation.enable = false;

    systemd.services.lightbyte-guest-agent = {
      description = "lightbyte guest agent (vsock port 1024)";
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${lightbyte.guest-agent}/bin/lightbyte-guest-agent";
        Restart = "always";
      };
    };

    systemd.services.lightbyte-proxy = lib.mkIf config.lightbyte.guest.proxy {
      description = "lightbyte load-balancing proxy";
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${lightbyte.lightbyte-proxy}/bin/lightbyte-proxy run --control /run/lightbyte-proxy.sock --config /run/lightbyte/config/lb.json";
        Restart = "always";
      };
    };

    # The guest agent's service for the proxy: reload applies the configuration it wrote.
    environment.etc."lightbyte/services/proxy" = lib.mkIf config.lightbyte.guest.proxy {
      mode = "0755";
      text = ''
        #!/bin/sh
        case "$1" in
          reload) exec ${lightbyte.lightbyte-proxy}/bin/lightbyte-proxy apply --control /run/lightbyte-proxy.sock /run/lightbyte/config/lb.json ;;
          status) exec ${lightbyte.lightbyte-proxy}/bin/lightbyte-proxy status --control /run/lightbyte-proxy.sock ;;
          *) echo "usage: $0 reload|status" >&2; exit 2 ;;
        esac
      '';
    };

    system.build.raw = import "${modulesPath}/../lib/make-disk-image.nix" {
      inherit lib config pkgs;
      format = "raw";
      partitionTableType = "none";
      diskSize = "auto";
    };
    system.stateVersion = "24.11";
  };
}
