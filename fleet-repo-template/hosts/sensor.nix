{ ... }: {
  networking.hostName = "sensor";
}
