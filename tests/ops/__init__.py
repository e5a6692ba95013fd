"""Operations: packaging, systemd, metrics and logs, libvirt."""
