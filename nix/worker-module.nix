# A worker host: the lightbyte worker agent as a systemd service, with what it needs (KVM, the
# bridge its VMs' TAPs join, IP forwarding), pointed at the cluster's etcd and control plane.
{ lightbyte }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.lightbyte-worker;
in
{
  options.services.lightbyte-worker = {
    enable = lib.mkEnableOption "the lightbyte worker agent";
    name = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      description = "The worker's name in the cluster.";
    };
    etcd = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      example = [ "http://10.0.0.1:2379" ];
      description = "etcd endpoints of the cluster.";
    };
    server = lib.mkOption {
      type = lib.types.str;
      example = "http://10.0.0.1:7070";
      description = "The control plane images are pulled from.";
    };
    subnet = lib.mkOption {
      type = lib.types.str;
      example = "10.124.1.0/24";
      description = "This worker's VM subnet; the bridge takes its first address.";
    };
    listen = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "10.0.0.11:7071";
      description = "Where the agent serves its VMs' guest agents, disks of moves and host proxies.";
    };
    kernel = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "Kernel for images that name none.";
    };
    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "More `lightbyte worker` arguments (--cpus, --memory, --label K=V ...).";
    };
  };

  config = lib.mkIf cfg.enable {
    boot.kernelModules = [ "kvm-intel" "kvm-amd" "tun" "vhost_vsock" ];
    boot.kernel.sysctl."net.ipv4.ip_forward" = 1;
    environment.systemPackages = [ lightbyte.lightbyte lightbyte.vmm ];
    systemd.services.lightbyte-worker = {
      description = "lightbyte worker agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      path = [ pkgs.iproute2 pkgs.procps ];
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([
          "${lightbyte.lightbyte}/bin/lightbyte" "worker"
          "--etcd" (lib.concatStringsSep "," cfg.etcd)
          "--name" cfg.name
          "--server" cfg.server
          "--subnet" cfg.subnet
          "--state-dir" "/var/lib/lightbyte"
          "--vmm" "${lightbyte.vmm}/bin/vmm"
          "--proxy" "${lightbyte.lightbyte-proxy}/bin/lightbyte-proxy"
        ] ++ lib.optionals (cfg.listen != null) [ "--listen" cfg.listen ]
          ++ lib.optionals (cfg.kernel != null) [ "--kernel" "${cfg.kernel}" ]
          ++ cfg.extraArgs);
        # VMs outlive restarts of the agent: it re-adopts their vmm processes.
        KillMode = "process";
        Restart = "always";
        StateDirectory = "lightbyte";
      };
    };
  };
}
