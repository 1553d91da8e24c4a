#!/usr/bin/env bash
# sshd for the pods of an lmi-core MPI group (install as /usr/local/bin/lmi-sshd in the image).
# Reads the key pair from the lmi-ssh secret (/etc/lmi/ssh), writes the client config the leader's
# mpirun uses (PRTE_MCA_plm_ssh_agent="ssh -F /etc/lmi/ssh_config") and runs sshd in the foreground
# on port 2222. Sessions whose client is gone (a cut link) end after 3 missed probes (15 s).
set -euo pipefail
dir=/etc/lmi
mkdir -p "${dir}" /run/sshd /root/.ssh
install -m 0600 "${dir}/ssh/id_ed25519" "${dir}/id_ed25519"
install -m 0600 "${dir}/ssh/authorized_keys" /root/.ssh/authorized_keys
[ -f "${dir}/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "${dir}/host_ed25519"
cat > "${dir}/ssh_config" <<CONFIG
Host *
  Port 2222
  User root
  IdentityFile ${dir}/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  ConnectTimeout 10
  ServerAliveInterval 5
  ServerAliveCountMax 3
  LogLevel ERROR
CONFIG
cat > "${dir}/sshd_config" <<CONFIG
Port 2222
HostKey ${dir}/host_ed25519
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
ClientAliveInterval 5
ClientAliveCountMax 3
# The ranks need the image's environment (PATH with the venv, the interface variables).
SetEnv PATH=${PATH} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
CONFIG
exec /usr/sbin/sshd -D -e -f "${dir}/sshd_config"
