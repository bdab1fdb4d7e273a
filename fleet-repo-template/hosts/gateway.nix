{ ... }: {
  networking.hostName = "gateway";
  services.mosquitto.enable = true;
}
