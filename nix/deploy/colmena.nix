# An example cluster of three hosts with colmena: host-1 runs etcd and the control plane (with
# the image store), every host runs a worker agent. Addresses are examples; adapt them.
{ nixpkgs, lightbyte, workerModule }:
let
  hosts = {
    host-1 = { address = "10.0.0.11"; subnet = "10.124.1.0/24"; };
    host-2 = { address = "10.0.0.12"; subnet = "10.124.2.0/24"; };
    host-3 = { address = "10.0.0.13"; subnet = "10.124.3.0/24"; };
  };
  etcd = "http://10.0.0.11:2379";
  server = "http://10.0.0.11:7070";
  worker = name: h: { ... }: {
    imports = [ workerModule ];
    deployment.targetHost = h.address;
    networking.hostName = name;
    services.lightbyte-worker = {
      enable = true;
      etcd = [ etcd ];
      inherit server;
      inherit (h) subnet;
      listen = "${h.address}:7071";
    };
  };
in
{
  meta.nixpkgs = import nixpkgs { system = "x86_64-linux"; };

  host-1 = { pkgs, ... }: {
    imports = [ (worker "host-1" hosts.host-1) ];
    services.etcd = {
      enable = true;
      listenClientUrls = [ etcd "http://127.0.0.1:2379" ];
      advertiseClientUrls = [ etcd ];
    };
    systemd.services.lightbyte-server = {
      description = "lightbyte control plane";
      wantedBy = [ "multi-user.target" ];
      after = [ "etcd.service" ];
      serviceConfig = {
        ExecStart = "${lightbyte.lightbyte}/bin/lightbyte server --etcd ${etcd} --listen 10.0.0.11:7070 --image-dir /var/lib/lightbyte-server/images";
        StateDirectory = "lightbyte-server";
        Restart = "always";
      };
    };
    networking.firewall.allowedTCPPorts = [ 2379 7070 7071 ];
  };
  host-2 = worker "host-2" hosts.host-2;
  host-3 = worker "host-3" hosts.host-3;
}
